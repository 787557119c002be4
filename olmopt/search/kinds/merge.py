"""The parameter-space merge decision as a joint stage, over the methods of ``olmopt.methods.registry``.

Searched jointly: the method, then its dimensions as the registry declares them (``{method}.{dim}``,
conditional on the method; a per-variant parameter is one dimension per variant, ``{method}.weights.0``),
the variants' priority order for methods where it matters (``{method}.order``) and the random seed of
stochastic methods (``{method}.seed``). Known-good points are enqueued first: task arithmetic at
lambda = 1/n, Circuit-Merge at the original script's defaults, and every other listed method (but
DELLA) at its defaults.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

from optuna.trial import Trial

from olmopt.errors import InputError
from olmopt.methods.delta import MethodSpec, get_method
from olmopt.methods.registry import SearchDim
from olmopt.recipe import ParamMerge, Recipe
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind

if TYPE_CHECKING:
    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter

MAX_ORDERS = 24  # orders searched as one categorical; beyond 4 variants the given order is kept
SEED_HIGH = 1023
LEGACY_ENQUEUED = ("task_arithmetic", "circuit", "della")  # enqueued as before the registry (or not)


def variants_of(env: SpaceEnv, base: str) -> list[str]:
    chosen = env.config.decisions.merge.models
    return list(chosen) if chosen else [m for m in env.pool_names if m != base]


def orders(n: int, search: bool) -> list[str]:
    perms = list(itertools.permutations(range(n))) if search else [tuple(range(n))]
    if len(perms) > MAX_ORDERS:
        perms = [tuple(range(n))]
    return [",".join(map(str, p)) for p in perms]


def suggest(trial: Trial, spec: MethodSpec, dim: SearchDim) -> float:
    key = f"{spec.name}.{dim.name}"
    if dim.kind == "int":
        return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
    return trial.suggest_float(key, dim.low, dim.high, log=dim.log)


def default_point(spec: MethodSpec, count: int) -> dict[str, Any]:
    """Search values at the method's defaults (clipped into each dimension's range)."""
    point: dict[str, Any] = {}
    defaults = spec.defaults()
    for dim in spec.search_dims(count):
        default = defaults.get(dim.name.split(".")[0])
        value = float(default) if isinstance(default, int | float) else dim.low
        point[f"{spec.name}.{dim.name}"] = min(max(value, dim.low), dim.high)
    return point


def merge_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    assert incumbent is not None
    cfg = env.config.decisions.merge
    base = incumbent.base
    variants = variants_of(env, base)
    specs = {name: get_method(name) for name in cfg.methods}
    for spec in specs.values():
        try:
            spec.check_count(len(variants))
        except InputError as exc:
            raise InputError(f"decisions.merge.methods: {exc}") from None
    order_choices = orders(len(variants), cfg.search_order)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        spec = specs[str(trial.suggest_categorical("method", list(cfg.methods)))]
        values = {dim.name: suggest(trial, spec, dim) for dim in spec.search_dims(len(variants))}
        params = spec.params_from_search(values, len(variants))
        order = list(range(len(variants)))
        if spec.priority_ordered:
            order = [
                int(i) for i in str(trial.suggest_categorical(f"{spec.name}.order", order_choices)).split(",")
            ]
        seed = trial.suggest_int(f"{spec.name}.seed", 0, SEED_HIGH) if spec.stochastic else 0
        merge = ParamMerge(
            method=spec.name, base=base, models=tuple(variants[i] for i in order), params=params, seed=seed
        )
        return f"#{trial.number}", Recipe(base=base, param_merge=merge)

    enqueue: list[tuple[str, dict[str, object]]] = []
    if "task_arithmetic" in specs:
        enqueue.append(
            (
                "task_arithmetic@1/n",
                {"method": "task_arithmetic", "task_arithmetic.lambda": 1.0 / len(variants)},
            )
        )
    if "circuit" in specs:
        point = default_point(specs["circuit"], len(variants))
        enqueue.append(
            (
                "circuit@defaults",
                {"method": "circuit", **point, "circuit.order": order_choices[0], "circuit.seed": 0},
            )
        )
    for name, spec in specs.items():
        if name in LEGACY_ENQUEUED:
            continue
        point = default_point(spec, len(variants))
        if spec.priority_ordered:
            point[f"{name}.order"] = order_choices[0]
        if spec.stochastic:
            point[f"{name}.seed"] = 0
        enqueue.append((f"{name}@defaults", {"method": name, **point}))
    return StageSpace(decode=decode, enqueue=enqueue, budget=stage.n_trials)


class MergeKind(DecisionKind):
    """``decisions.merge: joint``: the parameter-space merge, right after the base."""

    stage_kinds = ("joint-merge",)
    order = 10
    joint = True
    plots_trials = True

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.merge
        return [planned("joint-merge", n_trials=d.n_trials)] if d.mode == "joint" else []

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return merge_space(stage, incumbent, env)


register_kind(MergeKind())
