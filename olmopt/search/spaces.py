"""Decision kinds as stage search spaces: what a stage enqueues, how a trial decodes into a Recipe.

A decision kind registers a builder in ``SPACES`` (kind name -> ``builder(stage, incumbent, env)``).
The runner needs nothing else: it enqueues ``space.enqueue``, asks the sampler for up to ``budget``
trials, decodes each with ``space.decode`` and, unless ``space.decide`` is given, selects by
feasible Pareto set + Copeland.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from optuna.trial import FrozenTrial, Trial

from olmopt.config import StudyConfig
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import Recipe
from olmopt.search.plan import (
    Stage,
    apply_choice,
    current_donor,
    greedy_candidates,
    joint_slots,
    prefix_layer,
)


class SpaceEnv(Protocol):
    """What a space builder may look at: the config, the pool's names and the architecture."""

    config: StudyConfig
    pool_names: list[str]
    adapter: ArchitectureAdapter
    param_names: list[str]
    context: Any  # olmopt.search.context.EvalContext
    pool: Any  # olmopt.pool.model_pool.ModelPool
    decisions: dict[str, dict[str, Any]]  # the campaign's decisions so far, by stage key


# decide(trials by label, scores, feasible, keep) -> winning label or None (keep the incumbent)
Decide = Callable[[dict[str, FrozenTrial], dict[str, dict[str, float]], dict[str, bool], str | None], str | None]


@dataclass
class StageSpace:
    """Everything the runner needs to drive one stage."""

    decode: Callable[[Trial], tuple[str, Recipe]]
    enqueue: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (label, fixed params)
    budget: int | None = None  # None: only the enqueued trials
    layer: int | None = None  # prefix-cache layer shared by every candidate
    decide: Decide | None = None  # custom acceptance rule (default: Copeland selection)
    # a trial that is more than one evaluation (the ES sigma search): run in this process, returns the
    # Recipe its metrics belong to and the metrics
    run: Callable[[Trial, Recipe], tuple[Recipe, dict[str, float]]] | None = None
    details: Callable[[dict[str, FrozenTrial]], dict[str, Any]] | None = None  # extra decision fields


def swap_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """Greedy OLM stage: every pool model's version of one slot."""
    pool = env.pool_names
    if stage.kind == "base" and env.config.decisions.base.mode == "fixed":
        pool = [env.config.base_model]  # a fixed base is scored once: the reference for improve_all
    candidates = greedy_candidates(stage, incumbent, pool)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        label = str(trial.suggest_categorical("donor", list(candidates)))
        return label, candidates[label]

    return StageSpace(
        decode=decode,
        enqueue=[(label, {"donor": label}) for label in candidates],
        layer=prefix_layer(stage, env.adapter),
    )


def joint_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """One sampler over every slot's donor at once; the incumbent is the first trial."""
    assert incumbent is not None
    slots = joint_slots(stage, env.config, env.adapter, env.param_names)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        recipe = incumbent
        for slot in slots:
            recipe = apply_choice(recipe, slot, str(trial.suggest_categorical(slot, env.pool_names)))
        label = "incumbent" if recipe == incumbent else f"#{trial.number}"
        return label, recipe

    keep = {slot: current_donor(incumbent, slot, env.adapter) for slot in slots}
    return StageSpace(decode=decode, enqueue=[("incumbent", keep)], budget=stage.n_trials)


SPACES: dict[str, Callable[[Stage, Recipe | None, SpaceEnv], StageSpace]] = {
    "base": swap_space,
    "boundary": swap_space,
    "layer": swap_space,
    "unit": swap_space,
    "joint-layers": joint_space,
    "joint-units": joint_space,
}


def register_space(kind: str, builder: Callable[[Stage, Recipe | None, SpaceEnv], StageSpace]) -> None:
    SPACES[kind] = builder


# Decision kinds living in their own modules register themselves on import.
from olmopt.search import dfs_space, es_space, es_tune, fusion_space, merge_space  # noqa: E402, F401
