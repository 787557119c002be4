"""Evaluation context of a campaign: the pool, the resident working model and the evaluator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from olmopt.config import StudyConfig, default_objective_name
from olmopt.evaluate.engine import Evaluator, Objective, PrefixStore
from olmopt.evaluate.lmeval import LmEvalEvaluator, spec_of
from olmopt.methods.dfs.resident import ResidentPool, dfs_eval_model
from olmopt.methods.fusion.resident import fused, without_fusion
from olmopt.patch import WorkingModel
from olmopt.pool.model_pool import ModelPool, load_tokenizer
from olmopt.recipe import Recipe, layers_removed
from olmopt.runtime import configure_threads


def objectives_of(config: StudyConfig) -> list[Objective]:
    return [
        Objective(
            name=o.name or default_objective_name(o),
            path=config.path(o.dataset if o.kind == "dataset" else (o.include_path or ".")),
            metric=o.metric,
            held_out=o.held_out,
            samples=o.samples,
            lm_eval=spec_of(o, Path(config.root)) if o.kind == "lm_eval" else None,
        )
        for o in config.objectives
    ]


def directions_of(config: StudyConfig) -> dict[str, str]:
    """Objective name -> "minimize" / "maximize"."""
    return {o.name: o.direction for o in objectives_of(config)}


def open_pool(config: StudyConfig) -> ModelPool:
    base_dir = config.path(config.pool.base_dir) if config.pool.base_dir else config.path(".")
    return ModelPool(config.pool.models, base_dir=base_dir, trust_remote_code=config.pool.trust_remote_code)


class EvalContext:
    """Scores Recipes on one resident model; keeps the prefix cache valid for the current incumbent."""

    def __init__(self, config: StudyConfig, pool: ModelPool | None = None) -> None:
        configure_threads()  # OLMOPT_THREADS, default 1: torch's own default (every core) thrashes a busy machine
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
        )
        lm_objs = [o for o in self.objectives if o.kind == "lm_eval"]  # lm-eval tasks wrap the same resident model
        self.lm_eval = (
            LmEvalEvaluator(self.working.model, tokenizer, lm_objs, ev.batch_size, greedy=_kv_greedy) if lm_objs else None
        )
        self._prefix_recipe: Recipe | None = None  # the incumbent whose hidden states the evaluator holds
        self._carried: dict[str, PrefixStore] = {}  # candidate digest -> inputs of the layers after its own
        self._carried_bytes = 0
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
        if recipe.dfs is not None:
            values = self._score_dfs(recipe, split)
        else:
            values = self._score_patched(recipe, split, incumbent, layer)
        for obj in self.objectives:
            if obj.kind == "recipe":
                values[obj.name] = layers_removed(recipe, self.pool.adapter.num_layers)
        return {o.name: values[o.name] for o in self.objectives if o.name in values}

    @property
    def item_scores(self) -> dict[str, dict[int, float]]:
        """Per-item results of the last evaluation's lm-eval objectives: name -> document index -> value."""
        return self.lm_eval.item_scores if self.lm_eval is not None else {}

    def _score_patched(self, recipe: Recipe, split: str, incumbent: Recipe | None, layer: int | None) -> dict[str, float]:
        if incumbent is not None and not incumbent.dfs and self.working.recipe != without_fusion(incumbent):
            self.working.apply(without_fusion(incumbent))  # the new resident state; never undone
        in_stage = incumbent is not None and layer is not None and split == "search" and not recipe.fusion
        use_prefix = bool(in_stage and layer)
        carry: list[int] = []
        if in_stage:
            assert incumbent is not None and layer is not None
            if use_prefix:
                self._switch_prefix(incumbent, layer)
            elif self._prefix_recipe != incumbent:  # a layer-0 stage: nothing to reuse, but hold what was kept
                self._hold_inputs_of(incumbent)
            room = self.evaluator.prefix_bytes - self._carried_bytes
            carry = self.evaluator.carry_layers(layer, room // 2)  # the stage's later candidates get room too
        with self.working.patched(without_fusion(recipe)), fused(self.working.model, recipe):
            values = self.evaluator.evaluate(split, use_prefix=use_prefix, carry=carry)  # type: ignore[arg-type]
            if self.lm_eval is not None:
                values.update(self.lm_eval.evaluate(split))
        if self.evaluator.carried:
            below = self.evaluator.prefix_store if use_prefix else {}
            self._carried_bytes += sum(t.numel() * t.element_size() for e in self.evaluator.carried.values() for t in e.values())
            self._carried[recipe.digest()] = {
                key: {**{k: v for k, v in below.get(key, {}).items() if k <= layer}, **kept}  # type: ignore[operator]
                for key, kept in self.evaluator.carried.items()
            }
        return values

    def _take_carried(self, incumbent: Recipe) -> PrefixStore | None:
        """The inputs kept when ``incumbent`` was a candidate; the other candidates' are dropped."""
        carried = self._carried.pop(incumbent.digest(), None)
        self._carried.clear()
        self._carried_bytes = 0
        return carried

    def _hold_inputs_of(self, incumbent: Recipe) -> None:
        """A new incumbent in a stage without prefix (layer 0): keep its inputs for later stages."""
        self.evaluator.hold_prefix(self._take_carried(incumbent) or {})
        self._prefix_recipe = incumbent

    def _switch_prefix(self, incumbent: Recipe, layer: int) -> None:
        """Make the evaluator's prefix cache hold ``incumbent``'s hidden states entering ``layer``.

        In order of cost: the captures it holds (same incumbent, or one that differs only in later
        layers: an ES step, a later unit); the inputs kept when ``incumbent`` was evaluated as a
        candidate of the previous stage; a capture pass from the deepest input that is still valid (the
        embedding when none is).
        """
        from olmopt.patch import shared_prefix_depth

        if self._prefix_recipe != incumbent:
            old, store = self._prefix_recipe, self.evaluator.prefix_store
            depth = -1 if old is None else shared_prefix_depth(old, incumbent, self.working.adapter, self.working.param_names)
            valid = {key: {k: v for k, v in entry.items() if k <= depth} for key, entry in store.items()}
            carried = self._take_carried(incumbent)
            merged = carried if carried is not None else valid
            if not self.evaluator.adopt_prefix(merged, layer):
                self.evaluator.capture_prefix(layer, "search", start=valid)  # from the deepest valid input
            self._prefix_recipe = incumbent
        elif not self.evaluator.use_prefix_layer(layer):
            self.evaluator.capture_prefix(layer, "search", start=self.evaluator.prefix_store)

    def _score_dfs(self, recipe: Recipe, split: str) -> dict[str, float]:
        if self._resident is None:
            self._resident = ResidentPool(self.pool, self.working.device, self.working.dtype)
        model = dfs_eval_model(self._resident, recipe.dfs)  # type: ignore[arg-type]
        evaluator = Evaluator(model, self.evaluator.tokenizer, self.evaluator.objectives, batch_size=self.evaluator.batch_size)
        evaluator._encoded = self.evaluator._encoded  # share the tokenization cache
        values = evaluator.evaluate(split)  # type: ignore[arg-type]
        if self.lm_eval is not None:
            values.update(self.lm_eval.evaluate(split, model=model))
        return values


def _kv_greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int) -> Any:
    """olmopt's KV-cached greedy decoder, for lm-eval's generation requests on the resident model."""
    preds, _ = Evaluator(model, tokenizer, []).greedy(prompts, max_new_tokens)
    return preds
