"""Evaluation context of a campaign: the pool, the resident working model and the evaluator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from olmopt.config import StudyConfig, default_objective_name
from olmopt.evaluate.early_stop import (
    ChunkResult,
    Race,
    Scored,
    StopInputs,
    StopRule,
    known_chunk,
    run_chunks,
)
from olmopt.evaluate.engine import Evaluator, Objective
from olmopt.evaluate.item_scores import ItemScores
from olmopt.evaluate.lmeval import LmEvalEvaluator, spec_of
from olmopt.evaluate.prefix_cache import PrefixCache
from olmopt.methods.dfs.resident import ResidentPool, dfs_eval_model
from olmopt.methods.fusion.resident import fused, without_fusion
from olmopt.patch import WorkingModel
from olmopt.pool.model_pool import ModelPool, load_tokenizer
from olmopt.recipe import Recipe, layers_removed
from olmopt.runtime import configure_threads


class _NotKnown(Exception):
    """A replayed chunk whose items are not all known."""


def objectives_of(config: StudyConfig) -> list[Objective]:
    return [
        Objective(
            name=o.name or default_objective_name(o),
            path=config.path(o.dataset if o.kind == "dataset" else (o.include_path or ".")),
            metric=o.metric,
            held_out=o.held_out,
            samples=o.samples,
            test=o.test,
            lm_eval=spec_of(o, Path(config.root)) if o.kind == "lm_eval" else None,
        )
        for o in config.objectives
    ]


def chunked(config: StudyConfig) -> bool:
    """Whether candidates are scored chunk by chunk (early stopping or racing on)."""
    ev = config.evaluation
    return ev.early_stop.mode == "on" or ev.racing.mode == "on"


def directions_of(config: StudyConfig) -> dict[str, str]:
    """Objective name -> "minimize" / "maximize"."""
    return {o.name: o.direction for o in objectives_of(config)}


def open_pool(config: StudyConfig) -> ModelPool:
    base_dir = config.path(config.pool.base_dir) if config.pool.base_dir else config.path(".")
    return ModelPool(config.pool.models, base_dir=base_dir, trust_remote_code=config.pool.trust_remote_code)


class EvalContext:
    """Scores Recipes on one resident model; its prefix cache follows the incumbent."""

    def __init__(self, config: StudyConfig, pool: ModelPool | None = None) -> None:
        # OLMOPT_THREADS, default 1: torch's own default (every core) thrashes a busy machine
        configure_threads()
        self.config = config
        self.pool = pool or open_pool(config)
        self.working = WorkingModel(self.pool, config.base_model, device=config.evaluation.device)
        tokenizer = load_tokenizer(self.pool[config.base_model])
        ev = config.evaluation
        self.objectives = objectives_of(config)
        self.evaluator = Evaluator(
            self.working.model,
            tokenizer,
            [o for o in self.objectives if o.kind != "lm_eval"],
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            stop_at_first_mismatch=ev.stop_at_first_mismatch,
            chunks=(config.sampler.seed, ev.early_stop.chunk) if chunked(config) else None,
        )
        lm_objs = [
            o for o in self.objectives if o.kind == "lm_eval"
        ]  # lm-eval tasks wrap the same resident model
        self.lm_eval = (
            LmEvalEvaluator(self.working.model, tokenizer, lm_objs, ev.batch_size, greedy=_kv_greedy)
            if lm_objs
            else None
        )
        self.prefix = PrefixCache(self.evaluator, self.working.adapter, self.working.param_names)
        self._resident: ResidentPool | None = None

    def prepare(self) -> None:
        for split in ("search", "held_out"):
            if split == "held_out" and not any(o.held_out > 0 for o in self.objectives):
                continue
            self.evaluator.prepare(split)
            if self.lm_eval is not None:
                self.lm_eval.prepare(split)

    def score(
        self, recipe: Recipe, split: str = "search", incumbent: Recipe | None = None, layer: int | None = None
    ) -> dict[str, float]:
        """Objective values of ``recipe``.

        With ``incumbent`` the resident weights become the incumbent's first (so a candidate patches
        only the slot it changes), and with ``layer`` the prefix cache of that incumbent is used.
        Fusion recipes are fused on top of the patch and restored; data-flow paths run on the pool's
        resident layers. Metrics read off the Recipe (layers_removed) are added here.
        """
        return self.evaluate(recipe, split, incumbent, layer).metrics

    def evaluate(
        self,
        recipe: Recipe,
        split: str = "search",
        incumbent: Recipe | None = None,
        layer: int | None = None,
        stop: StopInputs | None = None,
    ) -> Scored:
        """``score`` with the per-item values. With early stopping or racing on (``evaluation``) a
        search-split evaluation runs chunk by chunk and stops when ``stop`` (the reference's per-item
        values, the race's peers) shows that ``recipe`` cannot win the stage (olmopt.evaluate.early_stop);
        lm-eval objectives and data-flow recipes are always scored whole."""
        if recipe.dfs is not None:
            scored = self._score_dfs(recipe, split)
        else:
            scored = self._score_patched(recipe, split, incumbent, layer, stop)
        return self._finish(recipe, split, scored)

    def chunked_for(self, recipe: Recipe) -> bool:
        """Whether a search-split evaluation of ``recipe`` runs chunk by chunk (early stopping or racing
        on; not for lm-eval objectives or data-flow recipes)."""
        return self.evaluator.chunks is not None and self.lm_eval is None and recipe.dfs is None

    def replay(self, recipe: Recipe, known: ItemScores, stop: StopInputs | None) -> Scored | None:
        """The chunked search evaluation of ``recipe`` read entirely from ``known`` per-item values (the
        evaluation cache), with the stops the evaluation itself would make against ``stop``; None when it
        would need an item that ``known`` lacks. Needs no model: a re-run replays a stopped candidate
        for free."""
        if not self.chunked_for(recipe):
            return None
        tokens = self._answer_tokens()

        def chunk(c: int) -> ChunkResult:
            hit = known_chunk(known, self.evaluator.chunk_items(c), tokens)
            if hit is None:
                raise _NotKnown
            return hit

        try:
            scored = self._run_chunks(recipe, stop or StopInputs(), chunk)
        except _NotKnown:
            return None
        return self._finish(recipe, "search", scored)

    def _finish(self, recipe: Recipe, split: str, scored: Scored) -> Scored:
        """Add the metrics read off the Recipe and keep the objectives that ``split`` has."""
        for obj in self.objectives:
            if obj.kind == "recipe":
                scored.metrics[obj.name] = layers_removed(recipe, self.pool.adapter.num_layers)
        scored.metrics = {
            o.name: scored.metrics[o.name]
            for o in self.objectives
            if o.name in scored.metrics and o.has_part(split)
        }
        return scored

    def item_counts(self, split: str = "search") -> dict[str, int]:
        """Objective -> number of items of ``split`` (dataset objectives; lm-eval tasks are not counted)."""
        scored = [o for o in self.objectives if o.kind not in ("recipe", "lm_eval") and o.has_part(split)]
        return {o.name: len(self.evaluator.encoded(o, split)) for o in scored}  # type: ignore[arg-type]

    @property
    def item_scores(self) -> dict[str, dict[int, float]]:
        """Per-item results of the last evaluation's lm-eval objectives: name -> document index -> value."""
        return self.lm_eval.item_scores if self.lm_eval is not None else {}

    @property
    def stop_rule(self) -> StopRule:
        cfg = self.config
        return StopRule(
            alpha=cfg.evaluation.early_stop.alpha,
            directions={o.name: o.direction for o in self.objectives},
            metric_of={o.name: o.metric for o in self.objectives},
            score=cfg.selection.score,
            # ties by confidence (no tolerance): the sequential test is itself the significance test
            tolerance=cfg.selection.tolerance or 0.0,
            boundary=cfg.evaluation.early_stop.boundary,
            spare_front=cfg.evaluation.early_stop.spare_front,
            spare_level=cfg.evaluation.early_stop.spare_level,
        )

    def _chunks(
        self,
        recipe: Recipe,
        stop: StopInputs,
        cache: PrefixCache | None,
        carry: list[int],
    ) -> Scored:
        """The early-stopping run of ``recipe`` on the current (patched) weights, chunk by chunk. Objectives
        read off the Recipe compare with the reference's values exactly (none: they certify nothing)."""
        ev = self.evaluator
        tokens = self._answer_tokens() if stop.known else {}
        ev.carried = {}  # chunk 0 may be read from ``stop.known``: nothing from the last candidate is kept

        def chunk(c: int) -> ChunkResult:
            hit = known_chunk(stop.known, ev.chunk_items(c), tokens) if stop.known else None
            if hit is not None:
                return hit
            ev.evaluate("search", prefix=cache, carry=carry, chunk=c)
            return ChunkResult(dict(ev.item_scores), dict(ev.item_tokens), list(ev.nonfinite))

        return self._run_chunks(recipe, stop, chunk)

    def _answer_tokens(self) -> dict[str, dict[int, int]]:
        """Perplexity objectives' token counts per search item (for values read, not evaluated)."""
        ev = self.evaluator
        return {o.name: ev.answer_tokens(o) for o in ev.objectives if o.metric == "perplexity"}

    def _run_chunks(self, recipe: Recipe, stop: StopInputs, chunk: Callable[[int], ChunkResult]) -> Scored:
        """``run_chunks`` with this campaign's rule, race and the differences read off the Recipe."""
        ev = self.evaluator
        num_layers = self.pool.adapter.num_layers
        known = {
            o.name: float(layers_removed(recipe, num_layers)) - stop.metrics[o.name]
            for o in self.objectives
            if o.kind == "recipe" and o.name in stop.metrics
        }
        racing = self.config.evaluation.racing
        race = Race(racing.eta, racing.first, stop.peers) if stop.peers is not None else None
        return run_chunks(chunk, ev.looks(), self.stop_rule, stop.reference, known, race, stop.against)

    def _score_patched(
        self,
        recipe: Recipe,
        split: str,
        incumbent: Recipe | None,
        layer: int | None,
        stop: StopInputs | None = None,
    ) -> Scored:
        if incumbent is not None and not incumbent.dfs and self.working.recipe != without_fusion(incumbent):
            self.working.apply(without_fusion(incumbent))  # the new resident state; never undone
        plan = self.prefix.before(recipe, incumbent, layer, split)
        chunked = self.evaluator.chunks is not None and split == "search" and self.lm_eval is None
        with self.working.patched(without_fusion(recipe)), fused(self.working.model, recipe):
            cache = self.prefix if plan.use else None
            if chunked:
                scored = self._chunks(recipe, stop or StopInputs(), cache, list(plan.carry))
            else:
                values = self.evaluator.evaluate(split, prefix=cache, carry=plan.carry)  # type: ignore[arg-type]
                scored = Scored(values, dict(self.evaluator.item_scores))
                if self.lm_eval is not None and split != "test":  # lm-eval tasks have no sealed test part
                    scored.metrics.update(self.lm_eval.evaluate(split))
                    scored.items.update(self.lm_eval.item_scores)
        self.prefix.after(recipe, plan, self.evaluator.carried)
        return scored

    def _score_dfs(self, recipe: Recipe, split: str) -> Scored:
        if self._resident is None:
            self._resident = ResidentPool(self.pool, self.working.device, self.working.dtype)
        model = dfs_eval_model(self._resident, recipe)
        evaluator = Evaluator(
            model, self.evaluator.tokenizer, self.evaluator.objectives, batch_size=self.evaluator.batch_size
        )
        evaluator._encoded = self.evaluator._encoded  # share the tokenization cache
        scored = Scored(evaluator.evaluate(split), dict(evaluator.item_scores))  # type: ignore[arg-type]
        if self.lm_eval is not None and split != "test":
            scored.metrics.update(self.lm_eval.evaluate(split, model=model))
            scored.items.update(self.lm_eval.item_scores)
        return scored


def _kv_greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> Any:
    """olmopt's KV-cached greedy decoder, for lm-eval's generation requests on the resident model."""
    preds, _ = Evaluator(model, tokenizer, []).greedy(prompts, max_new_tokens)
    return preds
