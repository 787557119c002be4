"""Evaluation context of a campaign: the pool, the resident working model and the evaluator."""

from __future__ import annotations

from transformers import AutoTokenizer

from olmopt.architecture_recipes import ResidentPool, dfs_eval_model, fused, layers_removed, without_fusion
from olmopt.config import StudyConfig, default_objective_name
from olmopt.evaluate.engine import Evaluator, Objective
from olmopt.patch import WorkingModel
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import Recipe


def objectives_of(config: StudyConfig) -> list[Objective]:
    return [
        Objective(
            name=o.name or default_objective_name(o),
            path=config.path(o.dataset),
            metric=o.metric,
            held_out=o.held_out,
            samples=o.samples,
        )
        for o in config.objectives
    ]


def open_pool(config: StudyConfig) -> ModelPool:
    base_dir = config.path(config.pool.base_dir) if config.pool.base_dir else config.path(".")
    return ModelPool(config.pool.models, base_dir=base_dir, trust_remote_code=config.pool.trust_remote_code)


class EvalContext:
    """Scores Recipes on one resident model; keeps the prefix cache valid for the current incumbent."""

    def __init__(self, config: StudyConfig, pool: ModelPool | None = None) -> None:
        self.config = config
        self.pool = pool or open_pool(config)
        self.working = WorkingModel(self.pool, config.base_model, device=config.evaluation.device)
        tokenizer = AutoTokenizer.from_pretrained(self.pool[config.base_model].path)
        ev = config.evaluation
        self.objectives = objectives_of(config)
        self.evaluator = Evaluator(
            self.working.model,
            tokenizer,
            self.objectives,
            batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens,
            stop_at_first_mismatch=ev.stop_at_first_mismatch,
        )
        self._prefix_key: str | None = None
        self._resident: ResidentPool | None = None

    def prepare(self) -> None:
        for split in ("search", "held_out"):
            if split == "held_out" and not any(o.held_out > 0 for o in self.objectives):
                continue
            self.evaluator.prepare(split)  # type: ignore[arg-type]

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
        return values

    def _score_patched(self, recipe: Recipe, split: str, incumbent: Recipe | None, layer: int | None) -> dict[str, float]:
        if incumbent is not None and not incumbent.dfs and self.working.recipe != without_fusion(incumbent):
            self.working.apply(without_fusion(incumbent))  # the new resident state; never undone
        use_prefix = bool(incumbent is not None and layer and split == "search" and not recipe.fusion)
        if use_prefix:
            digest = incumbent.digest()  # type: ignore[union-attr]
            if self._prefix_key != digest or not self.evaluator.use_prefix_layer(int(layer)):  # type: ignore[arg-type]
                self.evaluator.capture_prefix(int(layer), "search")  # type: ignore[arg-type]
                self._prefix_key = digest
        with self.working.patched(without_fusion(recipe)), fused(self.working.model, recipe):
            return self.evaluator.evaluate(split, use_prefix=use_prefix)  # type: ignore[arg-type]

    def _score_dfs(self, recipe: Recipe, split: str) -> dict[str, float]:
        if self._resident is None:
            self._resident = ResidentPool(self.pool, self.working.device, self.working.dtype)
        model = dfs_eval_model(self._resident, recipe.dfs)  # type: ignore[arg-type]
        evaluator = Evaluator(model, self.evaluator.tokenizer, self.objectives, batch_size=self.evaluator.batch_size)
        evaluator._encoded = self.evaluator._encoded  # share the tokenization cache
        return evaluator.evaluate(split)  # type: ignore[arg-type]
