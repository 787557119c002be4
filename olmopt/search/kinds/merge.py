"""The parameter-space merge decision as a joint stage, over the methods of ``olmopt.methods.registry``.

Searched jointly: the method, then its dimensions as the registry declares them (``{method}.{dim}``,
conditional on the method; a per-variant parameter is one dimension per variant, ``{method}.weights.0``),
the variants' priority order for methods where it matters (``{method}.order``) and the random seed of
stochastic methods (``{method}.seed``). Known-good points are enqueued first: task arithmetic at
lambda = 1/n, Circuit-Merge at the original script's defaults, and every other listed method (but
DELLA) at its defaults.

Layer-wise (``group_size`` set): each ``layerwise`` parameter a method declares per variant (weights,
density) is one dimension per variant and per group of ``group_size`` adjacent layers,
``{method}.{param}.{i}.g{g}``, decoded into the Recipe's ``ParamMerge.layer_params``; a parameter without
a declared search range (task arithmetic's weights) is searched over [0, 1] there. One group (group_size
at least the layer count) is the global setting, with today's dimensions.

Samplers (``sampler``; default the study's): TPE (multivariate, grouped), GP, or CMA-ES: Optuna's
``CmaEsSampler`` fed one scalar per trial, the Borda count of its objectives (the sum over objectives of
its rank among the stage's complete trials, 1 = best; an infeasible trial ranks after every feasible
one). Every objective is still stored and the stage winner is still chosen by the feasible Pareto set and
Copeland; the scalar only steers the sampler.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState

from olmopt.errors import InputError, StudyKeyError
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
LAYERWISE_RANGE = (0.0, 1.0)  # searched range of a layer-wise parameter that declares none


@dataclass(frozen=True)
class Layout:
    """The dimensions of one method in a stage: global ones, and layer-wise ones per group."""

    spec: MethodSpec
    count: int  # variants
    groups: int  # layer groups (1: no layer-wise dimensions)
    layerwise: tuple[str, ...]  # parameters searched per group
    size: int = 1  # layers per group

    def dims(self) -> list[SearchDim]:
        out = [d for d in self.spec.search_dims(self.count) if d.name.split(".")[0] not in self.layerwise]
        for name in self.layerwise:
            param = self.spec.param(name)
            low, high = (float(param.search[0]), float(param.search[1])) if param.search else LAYERWISE_RANGE
            out.extend(
                SearchDim(f"{name}.{i}.g{g}", low, high)
                for i in range(self.count)
                for g in range(self.groups)
            )
        return out

    def params(self, values: dict[str, float]) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
        """(global params, layer_params) from sampled values keyed by dimension name."""
        if not self.layerwise:
            return self.spec.params_from_search(values, self.count), {}
        params: dict[str, Any] = {}
        for param in self.spec.params:
            if param.search is None or param.name in self.layerwise:
                continue
            if param.per_variant:
                params[param.name] = tuple(float(values[f"{param.name}.{i}"]) for i in range(self.count))
            else:
                params[param.name] = values[param.name]
        layer_params = {
            name: tuple(
                tuple(float(values[f"{name}.{i}.g{g}"]) for i in range(self.count))
                for g in range(self.groups)
            )
            for name in self.layerwise
        }
        return params, layer_params


def layout(
    spec: MethodSpec, count: int, num_layers: int, group_size: int | None, wanted: Sequence[str]
) -> Layout:
    """Which of ``wanted`` parameters ``spec`` searches per layer group (per-variant ones it declares)."""
    groups = math.ceil(num_layers / group_size) if group_size else 1
    names: tuple[str, ...] = ()
    if groups > 1 and spec.search is None:  # methods with their own search mapping (DELLA) stay global
        names = tuple(p.name for p in spec.params if p.per_variant and p.name in wanted)
    return Layout(spec, count, groups if names else 1, names, group_size or num_layers)


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


def default_point(spec: MethodSpec, count: int, lay: Layout | None = None) -> dict[str, Any]:
    """Search values at the method's defaults (clipped into each dimension's range)."""
    point: dict[str, Any] = {}
    defaults = spec.defaults()
    for dim in lay.dims() if lay is not None else spec.search_dims(count):
        default = defaults.get(dim.name.split(".")[0])
        value = float(default) if isinstance(default, int | float) else dim.low
        point[f"{spec.name}.{dim.name}"] = min(max(value, dim.low), dim.high)
    return point


def check_variant_count(methods: Sequence[str], count: int) -> None:
    """Every listed method takes ``count`` variants (SLERP takes one), else one line naming the key;
    checked at ``study create`` (the count is known then: ``merge.models``, else the pool but the base)."""
    for name in methods:
        try:
            get_method(name).check_count(count)
        except InputError as exc:
            raise StudyKeyError(f"decisions.merge.methods: {exc}") from None


def merge_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    assert incumbent is not None
    cfg = env.config.decisions.merge
    base = incumbent.base
    variants = variants_of(env, base)
    specs = {name: get_method(name) for name in cfg.methods}
    check_variant_count(cfg.methods, len(variants))
    num_layers = env.adapter.num_layers
    layouts = {
        n: layout(s, len(variants), num_layers, cfg.group_size, cfg.layerwise) for n, s in specs.items()
    }
    order_choices = orders(len(variants), cfg.search_order)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        spec = specs[str(trial.suggest_categorical("method", list(cfg.methods)))]
        lay = layouts[spec.name]
        values = {dim.name: suggest(trial, spec, dim) for dim in lay.dims()}
        params, layer_params = lay.params(values)
        order = list(range(len(variants)))
        if spec.priority_ordered:
            order = [
                int(i) for i in str(trial.suggest_categorical(f"{spec.name}.order", order_choices)).split(",")
            ]
        seed = trial.suggest_int(f"{spec.name}.seed", 0, SEED_HIGH) if spec.stochastic else 0
        extra: dict[str, Any] = {}
        if layer_params:
            extra = {"layer_params": layer_params, "group_size": cfg.group_size}
        merge = ParamMerge(
            method=spec.name,
            base=base,
            models=tuple(variants[i] for i in order),
            params=params,
            seed=seed,
            **extra,
        )
        return f"#{trial.number}", Recipe(base=base, param_merge=merge)

    enqueue: list[tuple[str, dict[str, object]]] = []
    if "task_arithmetic" in specs:
        lay = layouts["task_arithmetic"]
        point = default_point(specs["task_arithmetic"], len(variants), lay) if lay.layerwise else {}
        point["task_arithmetic.lambda"] = 1.0 / len(variants)
        enqueue.append(("task_arithmetic@1/n", {"method": "task_arithmetic", **point}))
    if "circuit" in specs:
        point = default_point(specs["circuit"], len(variants), layouts["circuit"])
        enqueue.append(
            (
                "circuit@defaults",
                {"method": "circuit", **point, "circuit.order": order_choices[0], "circuit.seed": 0},
            )
        )
    enqueue.extend(mergekit_points(env, base, variants, specs, layouts, order_choices))
    for name, spec in specs.items():
        if name in LEGACY_ENQUEUED:
            continue
        point = default_point(spec, len(variants), layouts[name])
        if spec.priority_ordered:
            point[f"{name}.order"] = order_choices[0]
        if spec.stochastic:
            point[f"{name}.seed"] = 0
        enqueue.append((f"{name}@defaults", {"method": name, **point}))
    return StageSpace(decode=decode, enqueue=enqueue, budget=stage.n_trials)


# -- mergekit configurations as first trials ---------------------------------------------------------
def mergekit_points(
    env: SpaceEnv,
    base: str,
    variants: list[str],
    specs: dict[str, MethodSpec],
    layouts: dict[str, Layout],
    order_choices: list[str],
) -> list[tuple[str, dict[str, object]]]:
    """``decisions.merge.enqueue``: each mergekit YAML as a point of this stage's space (label
    ``mergekit:FILE``), refused (one line naming the entry) when the stage cannot represent it exactly."""
    from olmopt.mergekit import load_mergekit

    points: list[tuple[str, dict[str, object]]] = []
    for index, item in enumerate(env.config.decisions.merge.enqueue):
        key = f"decisions.merge.enqueue[{index}]"
        path = env.config.path(item)
        try:
            config = load_mergekit(path)
            names = _pool_names(config.models, config.keys, env)
            merge = config.build(env.adapter).renamed(names).param_merge
            point = _project(merge, base, variants, specs, layouts, order_choices, env.adapter.num_layers)
        except InputError as exc:
            raise StudyKeyError(f"{key}: {exc}") from None
        points.append((f"mergekit:{path.name}", point))
    return points


def _pool_names(refs: Sequence[str], keys: Sequence[str], env: SpaceEnv) -> dict[str, str]:
    """mergekit model reference -> pool name (same directory, or the same string without a pool)."""
    from olmopt.pool.resolve import resolve_model

    out = {}
    for ref, key in zip(refs, keys, strict=True):
        if ref in env.pool_names:
            out[ref] = ref
            continue
        if env.pool is None:
            raise InputError(f"{key}: model {ref} is not in the pool")
        try:
            directory = resolve_model(ref, base_dir=Path(env.config.root))
        except Exception:  # noqa: BLE001 - any failure: the model is not one of the pool's
            directory = None
        match = [
            name for name in env.pool_names if directory is not None and env.pool[name].path == directory
        ]
        if not match:
            raise InputError(f"{key}: model {ref} is not in the pool")
        out[ref] = match[0]
    return out


def _project(
    merge: ParamMerge | None,
    base: str,
    variants: list[str],
    specs: dict[str, MethodSpec],
    layouts: dict[str, Layout],
    order_choices: list[str],
    num_layers: int,
) -> dict[str, object]:
    """The stage's search values that decode into ``merge``'s weights (InputError when none do)."""
    from olmopt.methods.delta import make_params

    if merge is None:
        raise InputError("not a parameter-space merge (passthrough)")
    if merge.method not in specs:
        raise InputError(f"method {merge.method} is not in decisions.merge.methods")
    spec, lay = specs[merge.method], layouts[merge.method]
    if spec.search is not None:
        raise InputError(
            f"{spec.name} is searched through derived dimensions; it cannot be enqueued from mergekit"
        )
    if merge.base != base:
        raise InputError(f"base_model is {merge.base}, the stage's base is {base}")
    if sorted(merge.models) != sorted(variants):
        raise InputError(f"merges {', '.join(merge.models)}; the stage merges {', '.join(variants)}")
    count = len(variants)
    order = [variants.index(m) for m in merge.models]  # the config's priority order, as stage indices
    want = [make_params(spec.name, merge.params_at(layer)).resolve(count) for layer in range(num_layers)]
    size = lay.size
    values: dict[str, float] = {}
    for dim in lay.dims():
        name, *rest = dim.name.split(".")
        layer = int(rest[1][1:]) * size if len(rest) == 2 else 0
        value = want[layer][name]
        values[dim.name] = float(value[int(rest[0])] if rest else value)
    params, layer_params = lay.params(values)
    got = ParamMerge(
        method=spec.name, base=base, models=tuple(merge.models), params=params, layer_params=layer_params,
        group_size=size if layer_params else 1, seed=merge.seed,
    )  # fmt: skip
    for layer in range(num_layers):
        have = make_params(spec.name, got.params_at(layer)).resolve(count)
        for name, value in want[layer].items():
            if have[name] != value:
                raise InputError(
                    f"{name} on layer {layer} is {value}, the nearest point of this stage gives {have[name]} "
                    "(a value the stage keeps fixed, or finer layer groups than group_size)"
                )
    point: dict[str, object] = {"method": spec.name, **{f"{spec.name}.{k}": v for k, v in values.items()}}
    if spec.priority_ordered:
        text = ",".join(map(str, order))
        if text not in order_choices:
            raise InputError(f"the model order {', '.join(merge.models)} is not searched by this stage")
        point[f"{spec.name}.order"] = text
    elif order != sorted(order):
        raise InputError(f"list the models in the stage's order ({', '.join(variants)})")
    if spec.stochastic:
        if not 0 <= merge.seed <= SEED_HIGH:
            raise InputError(f"seed must be in [0, {SEED_HIGH}], got {merge.seed}")
        point[f"{spec.name}.seed"] = merge.seed
    return point


# -- samplers -----------------------------------------------------------------------------------------
def merge_sampler(
    config: Any, seed: int, fixed: dict[str, Any] | None = None
) -> optuna.samplers.BaseSampler | None:
    """The merge stage's own sampler (``decisions.merge.sampler``), or None for the study's; with ``fixed``
    params (always a sampler, TPE by default) every sampled trial takes those values."""
    from olmopt.search.seeding import TrialSeeded

    cfg, study_cfg = config.decisions.merge, config.sampler
    inner: optuna.samplers.BaseSampler
    if cfg.sampler is None and fixed is None:
        return None
    if cfg.sampler == "cmaes":
        inner = BordaCmaEs(seed=seed, population_size=study_cfg.population_size)
    elif cfg.sampler == "gp":
        inner = optuna.samplers.GPSampler(seed=seed, n_startup_trials=study_cfg.n_startup_trials)
    else:
        inner = optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, n_startup_trials=study_cfg.n_startup_trials
        )
    if fixed:
        inner = optuna.samplers.PartialFixedSampler(fixed, inner)
    return TrialSeeded(inner, seed)


def borda(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> dict[int, float]:
    """Trial number -> Borda count over the objectives (1 + how many trials are strictly better, summed);
    lower is better; infeasible trials (a constraint > 0) rank after every feasible one."""
    scores = {t.number: 0.0 for t in trials}
    for k, direction in enumerate(directions):
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
        column = sorted(sign * t.values[k] for t in trials)
        for t in trials:
            scores[t.number] += 1 + _count_below(column, sign * t.values[k])
    worst = len(directions) * (len(trials) + 1)
    for t in trials:
        if any(c > 0 for c in (t.constraints or {}).values()):
            scores[t.number] += worst
    return scores


def _count_below(column: list[float], x: float) -> int:
    import bisect

    return bisect.bisect_left(column, x)


class _ScalarView:
    """The stage study as CmaEsSampler sees it: single-objective (minimise), each complete trial's value
    its Borda count. Everything else (storage, system attrs) is the real study."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    @property
    def direction(self) -> StudyDirection:
        return StudyDirection.MINIMIZE

    @property
    def directions(self) -> list[StudyDirection]:
        return [StudyDirection.MINIMIZE]

    def _is_multi_objective(self) -> bool:
        return False

    def _get_trials(
        self, deepcopy: bool = True, states: Any = None, use_cache: bool = False
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache)
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
        scores = borda(complete, self._study.directions)
        out = []
        for t in trials:
            if t.number in scores:
                t = copy.copy(t)
                t.values = [scores[t.number]]
            out.append(t)
        return out

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=False, states=states)


class BordaCmaEs(optuna.samplers.BaseSampler):
    """Optuna's ``CmaEsSampler`` on a multi-objective stage: it is told each trial's Borda count."""

    def __init__(self, seed: int, population_size: int | None = None) -> None:
        self.cma = optuna.samplers.CmaEsSampler(
            seed=seed,
            popsize=population_size,
            n_startup_trials=1,
            warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        )

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.cma.infer_relative_search_space(_ScalarView(study), trial)  # type: ignore[arg-type]

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.cma.sample_relative(_ScalarView(study), trial, search_space)  # type: ignore[arg-type]

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.cma.sample_independent(_ScalarView(study), trial, param_name, param_distribution)  # type: ignore[arg-type]

    def reseed_rng(self) -> None:
        self.cma.reseed_rng()


class MergeKind(DecisionKind):
    """``decisions.merge: joint``: the parameter-space merge, right after the base."""

    stage_kinds = ("joint-merge",)
    order = 10
    joint = True
    plots_trials = True
    report_plot = "pareto"

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.merge
        return [planned("joint-merge", n_trials=d.n_trials)] if d.mode == "joint" else []

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return merge_space(stage, incumbent, env)

    def sampler(
        self, stage: Stage, config: StudyConfig, seed: int, env: SpaceEnv | None
    ) -> optuna.samplers.BaseSampler | None:
        """``decisions.merge.sampler`` (tpe, gp, cmaes); None: the study's sampler."""
        return merge_sampler(config, seed) if config.decisions.merge.sampler is not None else None


register_kind(MergeKind())
