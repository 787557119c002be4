"""Decision kinds as stage search spaces: what a stage enqueues, how a trial decodes into a Recipe.

A decision kind registers a builder in ``SPACES`` (kind name -> ``builder(stage, incumbent, env)``).
The runner needs nothing else: it enqueues ``space.enqueue``, asks the sampler for up to ``budget``
trials, decodes each with ``space.decode`` and, unless ``space.decide`` is given, selects by
feasible Pareto set + Copeland.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from optuna.distributions import CategoricalDistribution
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
    """Greedy stage: every pool model's version of one slot (a layer, a block of layers, a unit ...).

    In a later sweep, when the whole previous sweep changed nothing, the only candidate is the incumbent
    (its metrics are reused, so the stage costs no evaluation)."""
    pool = env.pool_names
    if stage.kind == "base" and env.config.decisions.base.mode == "fixed":
        pool = [env.config.base_model]  # a fixed base is scored once: the reference for improve_all
    if incumbent is not None and stage.sweep > 1 and not previous_sweep_changed(stage, env):
        candidates = {"incumbent": incumbent}
    else:
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
    """One sampler over every slot's donor at once. The incumbent is the first trial; with ``warm_start``
    each donor's whole model (every slot from that donor) follows, so the sampler starts from the
    points a user would try first. ``stage.n_trials`` counts evaluations: a repeated suggestion is free."""
    assert incumbent is not None
    slots = joint_slots(stage, env.config, env.adapter, env.param_names)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        recipe = incumbent
        for slot in slots:
            recipe = apply_choice(recipe, slot, str(trial.suggest_categorical(slot, env.pool_names)))
        label = "incumbent" if recipe == incumbent else f"#{trial.number}"
        return label, recipe

    keep = {slot: current_donor(incumbent, slot, env.adapter) for slot in slots}
    enqueue: list[tuple[str, dict[str, Any]]] = [("incumbent", keep)]
    decision = env.config.decisions.layers if stage.kind == "joint-layers" else env.config.decisions.tensors
    if decision.warm_start:
        enqueue += [(f"all-{donor}", dict.fromkeys(slots, donor)) for donor in env.pool_names]
        enqueue = [(label, params) for i, (label, params) in enumerate(enqueue) if params not in [p for _, p in enqueue[:i]]]
    return StageSpace(decode=decode, enqueue=enqueue, budget=stage.n_trials)


def joint_distributions(stage: Stage, env: SpaceEnv) -> dict[str, CategoricalDistribution]:
    """The joint stage's search space (for samplers that need it up front, such as CatCMA)."""
    slots = joint_slots(stage, env.config, env.adapter, env.param_names)
    return {slot: CategoricalDistribution(list(env.pool_names)) for slot in slots}


_SWEEP_KEY = re.compile(r"^\d+-(layer|block|unit)-.+?(?:-pass(\d+))?$")


def previous_sweep_changed(stage: Stage, env: SpaceEnv) -> bool:
    """Whether the previous sweep over the same slots (layers and blocks, or units) changed the recipe:
    its last decision against the decision just before it began, compared as weights."""
    from olmopt.patch import model_key  # torch: only where trials run

    family = {"unit"} if stage.kind == "unit" else {"layer", "block"}
    keys = sorted(env.decisions, key=lambda k: int(k.split("-", 1)[0]))
    before: str | None = None
    first = last = None
    for key in keys:
        if int(key.split("-", 1)[0]) >= stage.index:
            break
        match = _SWEEP_KEY.match(key)
        in_previous = match is not None and match.group(1) in family and int(match.group(2) or 1) == stage.sweep - 1
        if in_previous:
            first = first or key
            last = key
        elif first is None:
            before = key
    if first is None or last is None or before is None:
        return True  # nothing to compare with: search
    recipes = [Recipe.from_json(env.decisions[k]["recipe"]) for k in (before, last)]
    keys_ = [model_key(r, env.adapter, env.param_names) for r in recipes]
    return keys_[0] != keys_[1]


SPACES: dict[str, Callable[[Stage, Recipe | None, SpaceEnv], StageSpace]] = {
    "base": swap_space,
    "boundary": swap_space,
    "layer": swap_space,
    "block": swap_space,
    "unit": swap_space,
    "joint-layers": joint_space,
    "joint-units": joint_space,
}


def register_space(kind: str, builder: Callable[[Stage, Recipe | None, SpaceEnv], StageSpace]) -> None:
    SPACES[kind] = builder


# Decision kinds living in their own modules register themselves on import.
from olmopt.search import dfs_space, es_space, es_tune, fusion_space, merge_space  # noqa: E402, F401
