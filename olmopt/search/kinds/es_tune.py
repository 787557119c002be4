"""The "ES sigma" decision: a small Optuna search over initial sigma and generations before ES.

For each strategy with ``tune`` and each unit kind among its units (the unit name after the layer
index, e.g. ``mlp.down_proj``), one stage ``es-tune-{svd|norm}`` with target the unit kind runs before
the ES stages. Each trial samples ``sigma`` (log scale) and ``generations`` and runs that many ES
generations in this process on the kind's first unit (the probe), from the incumbent, with the stage
acceptance rule and the sigma schedule of the main run but its own offspring seeds (common to every
trial, so trials differ only by their settings). The trial's score is the improvement reached per
evaluation spent: the mean over objectives of the direction-signed relative change from the
incumbent to the last accepted offspring, divided by the number of offspring evaluated.

The stage keeps the incumbent (tuning explores, it does not change the model) and records the best
settings in its decision (``es_tune``); the ES stages of that strategy and unit kind then start from the
tuned sigma, and generations past the tuned count keep the incumbent without trials. The first trial is
the configured sigma and generations, so the search can only confirm or beat them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from olmopt.config import EsKindDecision
from olmopt.recipe import EsStep, Recipe
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind
from olmopt.search.kinds.es import (
    PARENT,
    TUNED,
    choose,
    es_stage_targets,
    es_units,
    kind_settings,
    parse_target,
    plan_generation,
    tuned,
    unit_kind,
)

if TYPE_CHECKING:
    from optuna.samplers import BaseSampler
    from optuna.trial import FrozenTrial, Trial

    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter

TUNE_KINDS = {"es-tune-svd": "svd", "es-tune-norm": "norm"}
CONFIGURED = "configured"
DETAILS = TUNED
__all__ = ["tuned", "unit_kind"]  # re-exported: they live with the ES stages that read the settings


def tune_targets(settings: dict[str, EsKindDecision], units: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(``es-tune-{kind}``, unit kind) for every tuned strategy and unit kind, in the ES order."""
    return [
        (f"es-tune-{kind}", k)
        for kind, block in settings.items()
        if block.tune is not None
        for k in dict.fromkeys(unit_kind(u) for u in units[kind])
    ]


def probe_unit(env: SpaceEnv, kind: str, target: str) -> str:
    """The first ES unit of this strategy whose kind is ``target``."""
    for stage_kind, es_target in es_stage_targets(env.config, env.adapter, env.param_names):
        if stage_kind == f"es-{kind}":
            unit, _ = parse_target(es_target)
            if unit_kind(unit) == target:
                return unit
    raise AssertionError(f"no {kind} ES unit of kind {target!r}")  # the plan made this stage from one


def gain(start: dict[str, float], end: dict[str, float], directions: dict[str, str]) -> float:
    """Mean over objectives of the direction-signed relative change from ``start`` to ``end``."""
    total = 0.0
    for name, direction in directions.items():
        change = (end[name] - start[name]) / max(abs(start[name]), 1e-12)
        total += change if direction == "maximize" else -change
    return total / len(directions)


def mini_es(
    env: SpaceEnv, incumbent: Recipe, kind: str, unit: str, sigma: float, generations: int
) -> tuple[Recipe, dict[str, float], dict[str, float], int]:
    """Run ``generations`` ES generations on ``unit`` from ``incumbent``.

    Returns (final Recipe, its metrics, the incumbent's metrics, offspring evaluated).
    """
    from olmopt.search.context import directions_of

    directions = directions_of(env.config)
    rule = env.config.decisions.es.acceptance
    layer = env.adapter.layer_of(unit + ".weight")
    context = env.context
    start = parent_metrics = context.score(incumbent, "search")
    parent, evaluations = incumbent, 0
    first = 1 + sum(1 for s in incumbent.es if s.unit == unit and s.kind == kind)
    for generation in range(first, first + generations):
        gen = plan_generation(env, parent, kind, unit, generation, sigma0=sigma, seed_tag="tune-")
        if gen.sigma is None:
            break
        offspring: dict[str, tuple[Recipe, dict[str, float]]] = {}
        for i, seed in enumerate(gen.seeds):
            if gen.offspring(gen.sigma, seed) is None:
                continue
            child = parent.with_es(EsStep(unit=unit, kind=kind, sigma=gen.sigma, seed=seed))  # type: ignore[arg-type]
            offspring[f"o{i:02d}"] = (child, context.score(child, "search", parent, layer))
            evaluations += 1
        metrics = {label: m for label, (_, m) in offspring.items()}
        winner = choose(metrics, parent_metrics, directions, rule, lambda label: label)
        if winner != PARENT:
            parent, parent_metrics = offspring[winner]
    return parent, parent_metrics, start, evaluations


def tune_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """Sample (sigma, generations), run a short ES on the probe unit, keep the incumbent."""
    from olmopt.errors import InputError
    from olmopt.search.context import directions_of

    if incumbent is None:
        raise InputError(
            f"stage {stage.key}: the sigma search needs a decided model (it cannot be the first stage)"
        )
    kind = TUNE_KINDS[stage.kind]
    block = kind_settings(env.config, kind)
    (sigma_low, sigma_high), (gen_low, gen_high) = block.tune_ranges()
    configured = {
        "sigma": min(max(block.sigma, sigma_low), sigma_high),
        "generations": min(max(block.generations, gen_low), gen_high),
    }
    unit = probe_unit(env, kind, stage.target)
    directions = directions_of(env.config)
    budget = block.tune.trials if block.tune else 1

    def decode(trial: Trial) -> tuple[str, Recipe]:
        trial.suggest_float("sigma", sigma_low, sigma_high, log=True)
        trial.suggest_int("generations", gen_low, gen_high)
        trial.set_user_attr("es.probe_unit", unit)
        return f"#{trial.number}", incumbent

    def run(trial: Trial, start: Recipe) -> tuple[Recipe, dict[str, float]]:
        sigma, generations = float(trial.params["sigma"]), int(trial.params["generations"])
        final, metrics, before, evaluations = mini_es(env, start, kind, unit, sigma, generations)
        improvement = gain(before, metrics, directions)
        trial.set_user_attr("es.evaluations", evaluations)
        trial.set_user_attr("es.improvement", improvement)
        trial.set_user_attr("es.gain_per_evaluation", improvement / max(evaluations, 1))
        return final, metrics

    def decide(
        trials: dict[str, FrozenTrial],
        scores: dict[str, dict[str, float]],
        feasible: dict[str, bool],
        keep: str | None,
    ) -> str | None:
        return None  # the incumbent stays; ``details`` records the chosen settings

    def details(trials: dict[str, FrozenTrial]) -> dict[str, Any]:
        return {DETAILS: best_settings(trials, kind, stage.target, unit, configured)}

    return StageSpace(
        decode=decode,
        enqueue=[(CONFIGURED, configured)],
        budget=budget,
        decide=decide,
        run=run,
        details=details,
    )


def best_settings(
    trials: dict[str, FrozenTrial], kind: str, target: str, unit: str, configured: dict[str, Any]
) -> dict[str, Any]:
    """The trial with the highest gain per evaluation (ties: larger gain, earlier trial).

    With no trial improving at all, the configured settings stay.
    """
    scored = [
        (
            float(t.user_attrs["es.gain_per_evaluation"]),
            float(t.user_attrs["es.improvement"]),
            -t.number,
            label,
            t,
        )
        for label, t in trials.items()
        if math.isfinite(float(t.user_attrs.get("es.gain_per_evaluation", math.nan)))
    ]
    found = {
        "kind": kind,
        "unit_kind": target,
        "probe_unit": unit,
        **configured,
        "trial": None,
        "gain_per_evaluation": 0.0,
    }
    if scored:
        per_eval, _, _, label, t = max(scored, key=lambda row: row[:3])
        if per_eval > 0:
            found.update(
                sigma=float(t.params["sigma"]), generations=int(t.params["generations"]), trial=t.number,
                label=label, gain_per_evaluation=per_eval, improvement=float(t.user_attrs["es.improvement"]),
            )  # fmt: skip
    return found


class EsTuneKind(DecisionKind):
    """``decisions.es.{svd,norm}.tune``: the ES sigma search, one stage per strategy and unit kind,
    before the ES stages."""

    stage_kinds = tuple(TUNE_KINDS)
    order = 70
    plots_trials = True
    report_plot = "es"

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        if config.decisions.es.svd is None and config.decisions.es.norm is None:
            return []
        settings, per_kind = es_units(config, adapter, param_names)
        return [planned(kind, target) for kind, target in tune_targets(settings, per_kind)]

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return tune_space(stage, incumbent, env)

    def sampler(
        self, stage: Stage, config: StudyConfig, seed: int, env: SpaceEnv | None
    ) -> BaseSampler | None:
        import optuna

        return optuna.samplers.QMCSampler(seed=seed, scramble=True)  # a few trials: space-filling


register_kind(EsTuneKind())
