"""The data-flow-space decision as a joint stage: a layer path over the pool's models.

Slots follow the seed's mask order (repetition, model, layer): an indicator per slot and a scale per
active slot (conditional: it exists only when the slot is on), plus the model whose embedding and
head frame the path. The identity path of each model is enqueued first. After a merge stage the
PS-merged model is one of the path's models (``MERGE_DONOR``, Sakana's PS+DFS): its hops read the
incumbent's merged layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import Trial

from olmopt.methods.dfs.path import DfsPath
from olmopt.recipe import MERGE_DONOR, Recipe
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind
from olmopt.search.kinds.swap import donor_pool, incumbent_of

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler

    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter


def dfs_models(env: SpaceEnv, incumbent: Recipe | None) -> list[str]:
    """The path's models: ``dfs.models`` (default the first two pool models), and the incumbent's
    parameter-space merge when it holds one."""
    chosen = env.config.decisions.dfs.models
    return donor_pool(list(chosen) if chosen else list(env.pool_names[:2]), incumbent)


def dfs_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    assert incumbent is not None
    cfg = env.config.decisions.dfs
    models = dfs_models(env, incumbent)
    num_layers = env.adapter.num_layers
    slots = [
        (r, m, layer)
        for r in range(cfg.repetitions)
        for m in range(len(models))
        for layer in range(num_layers)
    ]

    def decode(trial: Trial) -> tuple[str, Recipe]:
        frame = str(trial.suggest_categorical("io_model", models))
        hops: list[tuple[str, int]] = []
        scales: list[float] = []
        for r, m, layer in slots:
            if trial.suggest_int(f"on.{r}.{m}.{layer}", 0, 1):
                hops.append((models[m], layer))
                scales.append(trial.suggest_float(f"scale.{r}.{m}.{layer}", cfg.scale_low, cfg.scale_high))
        if not hops:  # an empty path is no model: fall back to the frame model's first layer
            hops, scales = [(frame, 0)], [1.0]
        path = DfsPath(hops=tuple(hops), scales=tuple(scales), input_model=frame, output_model=frame)
        uses_merge = MERGE_DONOR in {frame, *(m for m, _ in hops)}
        merge = incumbent.param_merge if uses_merge else None
        return f"#{trial.number}", Recipe(base=incumbent.base, param_merge=merge, dfs=path)

    enqueue: list[tuple[str, dict[str, object]]] = []
    for k, name in enumerate(models):
        params: dict[str, object] = {"io_model": name}
        for r, m, layer in slots:
            on = int(r == 0 and m == k)
            params[f"on.{r}.{m}.{layer}"] = on
            if on:
                params[f"scale.{r}.{m}.{layer}"] = 1.0
        enqueue.append((f"identity:{name}", params))
    return StageSpace(decode=decode, enqueue=enqueue, budget=stage.n_trials)


def dfs_distributions(stage: Stage, env: SpaceEnv) -> dict[str, BaseDistribution]:
    """The whole (unconditional) DFS space, declared up front for the CatCMA sampler."""
    cfg = env.config.decisions.dfs
    models = dfs_models(env, incumbent_of(stage, env.decisions))
    space: dict[str, BaseDistribution] = {"io_model": CategoricalDistribution(models)}
    for r in range(cfg.repetitions):
        for m in range(len(models)):
            for layer in range(env.adapter.num_layers):
                space[f"on.{r}.{m}.{layer}"] = IntDistribution(0, 1)
                space[f"scale.{r}.{m}.{layer}"] = FloatDistribution(cfg.scale_low, cfg.scale_high)
    return space


class DfsKind(DecisionKind):
    """``decisions.dfs: joint``: a data-flow path, the last decision of a campaign."""

    stage_kinds = ("joint-dfs",)
    order = 100
    joint = True
    plots_trials = True
    report_plot = "pareto"

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.dfs
        return [planned("joint-dfs", n_trials=d.n_trials)] if d.mode == "joint" else []

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return dfs_space(stage, incumbent, env)

    def sampler(
        self, stage: Stage, config: StudyConfig, seed: int, env: SpaceEnv | None
    ) -> BaseSampler | None:
        if config.decisions.dfs.sampler != "cmaes":
            return None
        from olmopt.search.catcma_sampler import CatCmaSampler

        assert env is not None
        return CatCmaSampler(
            dfs_distributions(stage, env), seed=seed, population_size=config.sampler.population_size
        )


register_kind(DfsKind())
