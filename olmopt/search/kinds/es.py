"""Evolution-strategy refinement as stages: one SVD-ES or norm-ES generation of one unit per stage.

A generation is a stage of kind ``es-svd`` or ``es-norm`` with target ``"{unit}@{generation}"``. It
enqueues the parent (the incumbent, label ``parent``) and lambda offspring (``o00``, ``o01`` ...); an
offspring trial's params are ``(unit, generation, offspring, sigma, seed)`` and it decodes to the
incumbent plus one ``EsStep(unit, kind, sigma, seed)``: the noise is regenerated from the seed,
never stored. The runner evaluates the trials (in parallel where workers allow) and calls this
stage's acceptance rule, which keeps the parent unless an offspring qualifies:

- ``pareto`` (default): no objective worse than the parent's and at least one strictly better;
- ``any`` (OLM): at least one objective strictly better than the parent's.

Qualifiers must be feasible (``improve_all`` constraints) with finite metrics; Copeland (Borda, then
offspring index) picks among them. The sigma schedule is OLM's and is a function of the incumbent
Recipe alone, so a resumed or re-planned stage recomputes it exactly: SVD-ES uses
``sigma0 * std(S)`` of the current tensor before its first accepted step on the unit and
``0.8 * sigma0 * std(S)`` after; norm-ES uses ``sigma0 * 0.9**k`` after ``k`` accepted steps.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from olmopt.config import EsKindDecision, StudyConfig
from olmopt.errors import InputError, StudyKeyError
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import EsStep, Recipe
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind
from olmopt.search.kinds.swap import tensor_units

if TYPE_CHECKING:  # torch and the operators load with the first ES stage, not with every CLI command
    import torch
    from optuna.trial import FrozenTrial, Trial

    from olmopt.methods.es.maths import SvdBasis
    from olmopt.pool.model_pool import ModelPool

ES_KINDS = {"es-svd": "svd", "es-norm": "norm"}
PARENT = "parent"
SEED_SPACE = 2**53  # seeds stay exact through Optuna's float64 parameter storage
REJECTED_ATTR = "es.rejected"
TUNED = "es_tune"  # the decision field where the ES sigma search (``es_tune``) records its settings
_LAYER_PREFIX = re.compile(r"^.*?\.\d+\.")


# -- plan ---------------------------------------------------------------------------------------------
def es_target(unit: str, generation: int) -> str:
    return f"{unit}@{generation}"


def parse_target(target: str) -> tuple[str, int]:
    """``"{unit}@{generation}"`` -> (unit, generation)."""
    unit, sep, generation = target.rpartition("@")
    if not sep or not unit or not generation.isdigit() or int(generation) < 1:
        raise InputError(f"ES stage target {target!r} must be UNIT@GENERATION (generation >= 1)")
    return unit, int(generation)


def kind_settings(config: StudyConfig, kind: str) -> EsKindDecision:
    """The ``decisions.es`` block of one strategy ('svd' or 'norm'), or the defaults when it is off."""
    from olmopt.config import NormEsDecision, SvdEsDecision

    chosen = getattr(config.decisions.es, kind)
    return chosen if chosen is not None else (SvdEsDecision() if kind == "svd" else NormEsDecision())


def check_units(
    units: list[str],
    adapter: ArchitectureAdapter,
    param_names: list[str],
    where: str,
    error: type[InputError] = InputError,
) -> list[str]:
    """One-line ``error`` for a unit that does not exist or has no ``.weight`` (what ES perturbs)."""
    known = set(adapter.all_units(param_names))
    names = set(param_names)
    for unit in units:
        if unit not in known:
            problem = "does not exist in this architecture"
        elif unit + ".weight" not in names:
            problem = "has no weight to perturb"
        else:
            continue
        raise error(f"{where}: unit {unit!r} {problem} ({unit_choices(adapter, param_names)})")
    return units


def unit_choices(adapter: ArchitectureAdapter, param_names: list[str]) -> str:
    """The units ES can perturb, sorted, in one line: the
    boundary ones, then each layer's once (N: the index)."""
    names = set(param_names)
    units = sorted(u for u in adapter.all_units(param_names) if u + ".weight" in names)
    first = adapter.layer_prefix(0)
    per_layer = [u.removeprefix(first) for u in units if u.startswith(first)]
    boundary = [u for u in units if adapter.layer_of(u) is None]
    layered = f"{adapter.layers_prefix}.N.{{{', '.join(per_layer)}}} with N in 0..{adapter.num_layers - 1}"
    return "units: " + ", ".join([*boundary, layered])


def es_units(
    config: StudyConfig,
    adapter: ArchitectureAdapter,
    param_names: list[str],
    units: list[str] | None = None,
    settings: dict[str, EsKindDecision] | None = None,
) -> tuple[dict[str, EsKindDecision], dict[str, list[str]]]:
    """(strategy -> its ``decisions.es`` block, strategy -> the units it refines), checked.

    ``settings`` defaults to the blocks of ``decisions.es`` that are on; ``units`` overrides every
    block's unit list.
    """
    if settings is None:
        es = config.decisions.es
        settings = {k: v for k, v in (("svd", es.svd), ("norm", es.norm)) if v is not None}
    per_kind: dict[str, list[str]] = {}
    error: type[InputError]
    for kind, block in settings.items():
        where, error = f"decisions.es.{kind}.units", StudyKeyError
        if units is not None:  # given on the command line
            where, error = "--es-unit", InputError
        chosen = units if units is not None else block.units
        if chosen is None:
            if config.decisions.tensors.mode == "off":
                raise StudyKeyError(f"{where}: tensor stages are off, so list the units to refine")
            chosen = tensor_units(config, adapter, param_names)
        per_kind[kind] = check_units(list(chosen), adapter, param_names, where, error)
    return settings, per_kind


def es_stage_targets(
    config: StudyConfig,
    adapter: ArchitectureAdapter,
    param_names: list[str],
    units: list[str] | None = None,
    settings: dict[str, EsKindDecision] | None = None,
    first_generation: Callable[[str, str], int] | None = None,
) -> list[tuple[str, str]]:
    """(stage kind, target) of the ES stages, per unit: SVD-ES generations, then norm-ES generations.

    ``settings`` and ``units`` as :func:`es_units`; ``first_generation(kind, unit)`` numbers
    generations after earlier ES stages (refinement). The sigma search's ``es-tune-{kind}`` stages,
    planned before these, come from ``olmopt.search.kinds.es_tune``.
    """
    settings, per_kind = es_units(config, adapter, param_names, units, settings)
    order = list(dict.fromkeys(u for kind in per_kind for u in per_kind[kind]))
    targets = []
    for unit in order:
        for kind, block in settings.items():
            if unit not in per_kind[kind]:
                continue
            start = first_generation(kind, unit) if first_generation else 1
            targets += [(f"es-{kind}", es_target(unit, start + g)) for g in range(block.generations)]
    return targets


def offspring_seed(sampler_seed: int, kind: str, unit: str, generation: int, index: int) -> int:
    """Deterministic seed of one offspring from (campaign sampler seed, kind, unit, generation, index)."""
    key = json.dumps([sampler_seed, kind, unit, generation, index]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % SEED_SPACE


def unit_kind(unit: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj``; a unit outside the layers is its own kind."""
    return _LAYER_PREFIX.sub("", unit, count=1)


def tuned(env: SpaceEnv, kind: str, unit: str) -> tuple[float | None, int | None]:
    """(sigma, generations) the sigma search chose for ``unit``'s kind; (None, None) without one."""
    for decision in (getattr(env, "decisions", None) or {}).values():
        found = decision.details.get(TUNED)
        if found and found["kind"] == kind and found["unit_kind"] == unit_kind(unit):
            return float(found["sigma"]), int(found["generations"])
    return None, None


# -- the parent tensor -----------------------------------------------------------------------------------
_POOLS: dict[str, ModelPool] = {}


def _pool(env: SpaceEnv) -> ModelPool:
    """The runner's pool when the env carries one, else one opened (once) from the config."""
    pool = getattr(env, "pool", None)
    if pool is not None:
        return pool
    from olmopt.search.context import open_pool

    key = json.dumps([env.config.pool.model_dump(mode="json"), env.config.root])
    if key not in _POOLS:
        _POOLS[key] = open_pool(env.config)
    return _POOLS[key]


def parent_tensor(env: SpaceEnv, incumbent: Recipe, unit: str) -> torch.Tensor:
    """``unit.weight`` under ``incumbent`` (ES steps replayed), in the working model's dtype and device."""
    from olmopt.patch import param_sources, source_tensor
    from olmopt.runtime import compute_dtype, pick_device

    name = unit + ".weight"
    device = pick_device(env.config.evaluation.device)
    source = param_sources(incumbent, env.adapter, [name])[name]
    return source_tensor(_pool(env), name, source, compute_dtype(device), device)


@dataclass
class Generation:
    """What one generation perturbs: the parent tensor, its sigma and offspring seeds."""

    kind: str
    unit: str
    generation: int
    tensor: torch.Tensor
    sigma: float | None  # None: ES does not apply to this tensor (1-D, size-1 dim, zero, non-finite)
    seeds: list[int]
    basis: SvdBasis | None = None

    def offspring(self, sigma: float, seed: int) -> torch.Tensor | None:
        from olmopt.methods.es import maths as es_ops

        if self.kind == "svd":
            return es_ops.svd_es_step(self.tensor, sigma, seed, self.basis)
        return es_ops.norm_es_step(self.tensor, sigma, seed)


def plan_generation(
    env: SpaceEnv,
    incumbent: Recipe,
    kind: str,
    unit: str,
    generation: int,
    sigma0: float | None = None,
    seed_tag: str = "",
) -> Generation:
    """Parent tensor, sigma (OLM's schedule, from the incumbent's ES steps) and lambda seeds.

    ``sigma0`` overrides the initial sigma (a tuned or a tuning value); ``seed_tag`` gives the sigma
    search its own offspring seeds, apart from the main run's.
    """
    import torch

    from olmopt.methods.es import maths as es_ops

    if sigma0 is None:
        sigma0 = kind_settings(env.config, kind).sigma
    tensor = parent_tensor(env, incumbent, unit)
    accepted = sum(1 for s in incumbent.es if s.unit == unit and s.kind == kind)
    gen = Generation(kind, unit, generation, tensor, None, [])
    if kind == "svd":
        gen.basis = es_ops.svd_basis(tensor)
        if gen.basis is None:
            return gen
        schedule = es_ops.svd_sigma_after_acceptance if accepted else es_ops.svd_initial_sigma
        gen.sigma = schedule(tensor, sigma0, gen.basis)
        d = gen.basis.S.numel()
    else:
        if not es_ops.es_applicable(tensor) or not bool(torch.isfinite(tensor).all()):
            return gen
        sigma = sigma0
        for _ in range(accepted):
            sigma = es_ops.norm_es_decay(sigma)
        gen.sigma, d = sigma, tensor.shape[0]
    seed = env.config.sampler.seed
    gen.seeds = [
        offspring_seed(seed, seed_tag + kind, unit, generation, i)
        for i in range(es_ops.es_population_size(d))
    ]
    return gen


# -- acceptance -----------------------------------------------------------------------------------------
def qualifies(
    candidate: dict[str, float], parent: dict[str, float], directions: dict[str, str], rule: str
) -> bool:
    """``any``: better on some objective; ``pareto``: also no worse on any. Non-finite never qualifies."""
    from olmopt.select import improves_on

    if not all(math.isfinite(candidate.get(o, math.nan)) for o in directions):
        return False
    if not improves_on(candidate, parent, directions):
        return False
    return rule == "any" or not improves_on(parent, candidate, directions)


def accept(
    trials: dict[str, FrozenTrial],
    scores: dict[str, dict[str, float]],
    feasible: dict[str, bool],
    directions: dict[str, str],
    rule: str,
    parent_json: str,
) -> str | None:
    """The winning offspring's label, the parent's label when none qualifies, None without a parent."""
    from olmopt.search.trials import RECIPE_ATTR

    if PARENT not in trials:
        return None
    offspring = {
        label: {o: scores[o][label] for o in directions}
        for label, t in trials.items()
        if label != PARENT and t.user_attrs.get(RECIPE_ATTR) != parent_json and feasible.get(label, True)
    }
    order = {label: t.number for label, t in trials.items()}
    return choose(offspring, {o: scores[o][PARENT] for o in directions}, directions, rule, order.__getitem__)


def choose(
    offspring: dict[str, dict[str, float]],
    parent: dict[str, float],
    directions: dict[str, str],
    rule: str,
    tie_key: Callable[[str], Any],
) -> str:
    """The qualifying offspring Copeland picks (Borda, then ``tie_key`` break ties), else ``PARENT``."""
    from olmopt.select import select

    qualified = [label for label, m in offspring.items() if qualifies(m, parent, directions, rule)]
    if not qualified:
        return PARENT
    sub = {o: {label: offspring[label][o] for label in qualified} for o in directions}
    winner = select(sub, directions, tie_key=tie_key).winner
    assert winner is not None  # every qualified offspring is a candidate
    return winner


# -- the stage space -------------------------------------------------------------------------------------
def es_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """One ES generation: the parent plus lambda seeded offspring, decided by the acceptance rule."""
    from olmopt.search.context import directions_of

    if incumbent is None:
        raise InputError(
            f"stage {stage.key}: ES needs a decided model to refine (it cannot be the first stage)"
        )
    kind = ES_KINDS[stage.kind]
    unit, generation = parse_target(stage.target)
    check_units([unit], env.adapter, env.param_names, f"stage {stage.key}")
    sigma0, generations = tuned(env, kind, unit)
    if generations is not None and generations < generation <= kind_settings(env.config, kind).generations:
        # the sigma search chose fewer generations: no trials, the incumbent stays
        return StageSpace(decode=lambda trial: (PARENT, incumbent), decide=lambda *_: None)
    gen = plan_generation(env, incumbent, kind, unit, generation, sigma0)
    directions = directions_of(env.config)
    rule = env.config.decisions.es.acceptance
    parent_json = incumbent.to_json()
    base_params: dict[str, Any] = {"unit": unit, "generation": generation}
    enqueue: list[tuple[str, dict[str, Any]]] = []
    if gen.sigma is not None:  # not applicable: nothing to try, the runner keeps the incumbent
        enqueue.append((PARENT, {**base_params, "offspring": -1}))
        enqueue += [
            (f"o{i:02d}", {**base_params, "offspring": i, "sigma": gen.sigma, "seed": seed})
            for i, seed in enumerate(gen.seeds)
        ]

    def decode(trial: Trial) -> tuple[str, Recipe]:
        trial.suggest_categorical("unit", [unit])
        trial.suggest_int("generation", generation, generation)
        index = trial.suggest_int("offspring", -1, max(len(gen.seeds) - 1, 0))
        if index < 0:
            return PARENT, incumbent
        sigma = trial.suggest_float("sigma", gen.sigma or 1.0, gen.sigma or 1.0)
        seed = trial.suggest_int("seed", 0, SEED_SPACE - 1)
        label = f"o{index:02d}"
        if gen.offspring(sigma, seed) is None:  # a numerical failure: evaluated as the parent, never accepted
            trial.set_user_attr(REJECTED_ATTR, "step not applicable or not finite")
            return label, incumbent
        return label, incumbent.with_es(EsStep(unit=unit, kind=kind, sigma=sigma, seed=seed))  # type: ignore[arg-type]

    def decide(
        trials: dict[str, FrozenTrial],
        scores: dict[str, dict[str, float]],
        feasible: dict[str, bool],
        keep: str | None,
    ) -> str | None:
        return accept(trials, scores, feasible, directions, rule, parent_json)

    layer = env.adapter.layer_of(unit + ".weight")
    return StageSpace(decode=decode, enqueue=enqueue, layer=layer, decide=decide)


class EsKind(DecisionKind):
    """``decisions.es``: one SVD-ES or norm-ES generation of one unit per stage."""

    stage_kinds = tuple(ES_KINDS)
    order = 80
    plots_trials = True
    report_plot = "es"

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        if config.decisions.es.svd is None and config.decisions.es.norm is None:
            return []
        return [planned(kind, target) for kind, target in es_stage_targets(config, adapter, param_names)]

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return es_space(stage, incumbent, env)


register_kind(EsKind())


# -- refinement of a finished campaign (export best --refine es) -------------------------------------
REFINE_INFO = "refine"


def refine_targets(
    campaign: Any,
    recipe: Recipe,
    adapter: ArchitectureAdapter,
    param_names: list[str],
    units: list[str] | None = None,
) -> list[tuple[str, str]]:
    """ES stages that refine ``recipe``'s units (or ``units``), numbered after the plan's ES stages.

    Uses the campaign's ``decisions.es`` blocks, or one SVD-ES and one norm-ES generation with the
    default sigmas when the campaign has none.
    """
    from olmopt.config import NormEsDecision, SvdEsDecision

    es = campaign.config.decisions.es
    settings = {k: v for k, v in (("svd", es.svd), ("norm", es.norm)) if v is not None}
    settings = settings or {"svd": SvdEsDecision(), "norm": NormEsDecision()}
    chosen = list(units) if units else list(recipe.units)
    if not chosen:
        raise InputError(
            f"campaign {campaign.name!r} decided no tensor units: pass --es-unit UNIT to refine "
            f"({unit_choices(adapter, param_names)})"
        )
    done: dict[tuple[str, str], int] = {}
    for stage in campaign.plan:
        if stage.kind in ES_KINDS:
            unit, generation = parse_target(stage.target)
            key = (ES_KINDS[stage.kind], unit)
            done[key] = max(done.get(key, 0), generation)
    return es_stage_targets(
        campaign.config,
        adapter,
        param_names,
        chosen,
        settings,
        lambda kind, unit: done.get((kind, unit), 0) + 1,
    )
