"""Warnings at ``study create`` about samplers that cannot work as configured (torch-free)."""

from __future__ import annotations

from olmopt.config import StudyConfig
from olmopt.search.kind import Stage
from olmopt.search.kinds import get_kind


def sampler_warnings(config: StudyConfig, plan: list[Stage]) -> list[str]:
    """One line per sampler setting that will not do what it says: a sampler named for a decision that
    has no joint stage, a campaign sampler with no joint stage at all, a budget below NSGA-II's two
    generations or TPE's random start-up."""
    warnings = []
    joint = [s for s in plan if get_kind(s.kind).joint]
    for key in ("layers", "tensors"):
        decision = getattr(config.decisions, key)
        if decision.sampler and decision.mode == "greedy" and not decision.then_joint:
            warnings.append(
                f"decisions.{key}.sampler {decision.sampler!r} has no effect: mode greedy without then_joint "
                "has no joint stage"
            )
    if not joint and "name" in config.sampler.model_fields_set:
        warnings.append(
            f"sampler.name {config.sampler.name!r} has no effect: every stage of this campaign is greedy"
        )
    for stage in joint:
        name = get_kind(stage.kind).sampler_name(config) or config.sampler.name
        if name == "nsga2" and stage.n_trials < 2 * config.sampler.nsga2_population(stage.n_trials):
            population = config.sampler.nsga2_population(stage.n_trials)
            warnings.append(
                f"stage {stage.key}: NSGA-II with a population of {population} and a budget of "
                f"{stage.n_trials} evaluations never leaves its random first generation (lower "
                "sampler.population_size or raise the budget)"
            )
        if name == "tpe" and stage.n_trials <= config.sampler.n_startup_trials:
            warnings.append(
                f"stage {stage.key}: TPE's {config.sampler.n_startup_trials} random start-up trials use up "
                f"the whole budget of {stage.n_trials}: it is random search (lower sampler.n_startup_trials)"
            )
    return warnings
