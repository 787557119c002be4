"""Joint donor decisions: one sampler over every layer's (``joint-layers``) or unit's (``joint-units``)
donor at once, within a budget of evaluations (docs/strategies.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from olmopt.search.equal_donors import distinct_donors
from olmopt.search.kind import DecisionKind, Extension, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind
from olmopt.search.kinds.base_lookahead import lookahead_spent, own_donors
from olmopt.search.kinds.swap import (
    BOUNDARY_SLOT,
    apply_choice,
    current_donor,
    donor_pool,
    incumbent_of,
    layer_runs,
    searched_layers,
    tensor_units,
)
from olmopt.search.tied_boundaries import BoundaryOffer, tied_boundaries

if TYPE_CHECKING:
    from collections.abc import Callable

    from optuna.distributions import CategoricalDistribution
    from optuna.trial import FrozenTrial, Trial

    from olmopt.config import StudyConfig, SwapDecision
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.recipe import Recipe


def joint_slots(
    stage: Stage, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]
) -> list[str]:
    """Parameter names of a joint stage: ``layer.{i}`` or ``unit.{name}``, and ``boundary`` in the layer
    stage when ``decisions.boundary`` is joint (``joint_choices`` leaves it out when it offers one donor)."""
    if stage.kind == "joint-layers":
        layers = [f"layer.{i}" for i in searched_layers(config, adapter)]
        return [BOUNDARY_SLOT, *layers] if config.decisions.boundary.mode == "joint" else layers
    return [f"unit.{u}" for u in tensor_units(config, adapter, param_names)]


@dataclass(frozen=True)
class JointChoices:
    """What a joint stage offers: ``slots`` (each slot, in ``joint_slots`` order, with its donors),
    ``same_as`` (layer or unit slot -> donor -> the offered donor with its weights there) and the boundary
    slot's ``offer``."""

    slots: dict[str, list[str]]
    same_as: dict[str, dict[str, str]]
    offer: BoundaryOffer

    def offered(self, slot: str, donor: str) -> str:
        """The donor offered in ``slot`` for ``donor``'s weights there (a layer or unit slot)."""
        return self.same_as.get(slot, {}).get(donor, donor)


def joint_choices(stage: Stage, incumbent: Recipe, env: SpaceEnv) -> JointChoices:
    """Each slot of a joint stage with the donors it offers: a layer or unit slot one donor per distinct
    set of its weights (search/equal_donors.py); the boundary slot every donor (``donors: all``) or the
    boundaries tied at the base decision (``donors: tied``, search/tied_boundaries.py; the slot is left
    out when only the incumbent's is)."""
    slots = joint_slots(stage, env.config, env.adapter, env.param_names)
    donors = donor_pool(env.pool_names, incumbent)
    choices = {slot: donors for slot in slots}
    same_as: dict[str, dict[str, str]] = {}
    for slot in slots:
        if slot != BOUNDARY_SLOT:
            own = current_donor(incumbent, slot, env.adapter)
            choices[slot], same_as[slot] = distinct_donors(slot, donors, own, env)
    offer = BoundaryOffer(offered=[])
    if BOUNDARY_SLOT in choices:
        own = current_donor(incumbent, BOUNDARY_SLOT, env.adapter)
        if env.config.decisions.boundary.donors == "tied":
            offer = tied_boundaries(env, own)
        else:
            offer = BoundaryOffer(offered=donors, same_as={d: d for d in donors})
        if len(offer.offered) > 1:
            choices[BOUNDARY_SLOT] = offer.offered
        else:
            del choices[BOUNDARY_SLOT]
    return JointChoices(choices, same_as, offer)


def joint_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """One sampler over every slot's donor at once. The incumbent is the first trial; with ``warm_start``
    each donor's whole model (every slot from that donor; the boundary when the slot offers that donor's
    boundary weights, else the incumbent's) follows, then the blocks (``warm_blocks``) and own layers
    (``warm_own``) of each donor on the incumbent, so the sampler starts from the points a user would
    try first. After a merge stage the donors include the PS merge (``donor_pool``). ``stage.n_trials``
    counts evaluations: a repeated suggestion is free."""
    assert incumbent is not None
    joint = joint_choices(stage, incumbent, env)
    choices, offer = joint.slots, joint.offer

    def decode(trial: Trial) -> tuple[str, Recipe]:
        recipe = incumbent
        for slot, donors in choices.items():
            recipe = apply_choice(recipe, slot, str(trial.suggest_categorical(slot, donors)))
        label = "incumbent" if recipe == incumbent else f"#{trial.number}"
        return label, recipe

    keep = {slot: current_donor(incumbent, slot, env.adapter) for slot in choices}
    enqueue: list[tuple[str, dict[str, Any]]] = [("incumbent", keep)]
    decision = env.config.decisions.layers if stage.kind == "joint-layers" else env.config.decisions.tensors
    if decision.warm_start:
        donors = donor_pool(env.pool_names, incumbent)
        for donor in donors:
            params = {slot: joint.offered(slot, donor) for slot in choices}
            if BOUNDARY_SLOT in choices:
                params[BOUNDARY_SLOT] = offer.same_as.get(donor, keep[BOUNDARY_SLOT])
            enqueue.append((f"all-{donor}", params))
        enqueue += block_starts(joint, keep, donors, decision.warm_blocks)  # tensors: 1, none
        if decision.warm_own:  # layers only
            enqueue += own_starts(joint, keep, donors, env)
        enqueue = [
            (label, params)
            for i, (label, params) in enumerate(enqueue)
            if params not in [p for _, p in enqueue[:i]]
        ]
    record = {"tied": offer.tied, "offered": list(choices.get(BOUNDARY_SLOT, offer.offered))}

    def details(_trials: dict[str, Any]) -> dict[str, Any]:  # what the tied rule offered, for the report
        return {"boundary_offer": record}

    tied = env.config.decisions.boundary.donors == "tied" and stage.kind == "joint-layers"
    guarded = BOUNDARY_SLOT in choices and env.config.decisions.boundary.switch == "significant"
    merge = env.config.decisions.merge
    extension = None
    if stage.kind == "joint-layers" and merge.mode == "challenge" and merge.yield_to_layers:
        extension = Extension(merge.n_trials, incumbent_leads(env.config))
    budget = stage.n_trials
    if stage.kind == "joint-layers":  # the base decision's lookahead was paid out of this stage's budget
        budget = max(1, budget - lookahead_spent(env.decisions))
    return StageSpace(
        decode=decode,
        enqueue=enqueue,
        budget=budget,
        extension=extension,
        details=details if tied else None,
        significant_boundary_switch=guarded,
    )


def block_starts(
    joint: JointChoices, keep: dict[str, str], donors: list[str], blocks: int
) -> list[tuple[str, dict[str, Any]]]:
    """Warm starts of contiguous blocks (``warm_blocks`` > 1): the layers cut into ``blocks`` runs of
    adjacent layers (the lower ones first, sizes differing by at most one), and each donor's weights in
    each run on the incumbent's other slots (label ``block{i}-{donor}``)."""
    if blocks < 2:
        return []
    runs = layer_runs([slot for slot in joint.slots if slot.startswith("layer.")], blocks)
    return [
        (f"block{i}-{donor}", {**keep, **{slot: joint.offered(slot, donor) for slot in run}})
        for i, run in enumerate(runs)
        for donor in donors
    ]


def own_starts(
    joint: JointChoices, keep: dict[str, str], donors: list[str], env: SpaceEnv
) -> list[tuple[str, dict[str, Any]]]:
    """Warm starts of own layers (``warm_own``): each partial fine-tune's own layers (``own_donors``: the
    searched layers whose weights no other pool model has) on the incumbent's other slots (label
    ``own-{donor}``), so a skill trained in adjacent layers arrives whole wherever the blocks cut it."""
    owned = own_donors(env)
    return [
        (f"own-{donor}", {**keep, **{f"layer.{i}": joint.offered(f"layer.{i}", donor) for i in owned[donor]}})
        for donor in donors
        if donor in owned
    ]


def incumbent_leads(config: StudyConfig) -> Callable[[list[FrozenTrial]], bool]:
    """Whether a joint stage's trials still lead with the incumbent: no feasible trial has a higher mean
    of the objectives on the search split (the ``selection.score: mean`` order, without its confidence
    ties); False when the incumbent is not among them or is infeasible."""
    from olmopt.search.context import objectives_of
    from olmopt.search.trials import LABEL_ATTR
    from olmopt.select import objective_mean

    objectives = objectives_of(config)
    directions = {o.name: o.direction for o in objectives}

    def due(trials: list[FrozenTrial]) -> bool:
        feasible = [t for t in trials if t.user_attrs.get("feasible", True) and t.values is not None]
        scores = {
            o.name: {str(t.number): float(t.values[i]) for t in feasible} for i, o in enumerate(objectives)
        }
        means = {str(t.number): objective_mean(scores, directions, str(t.number)) for t in feasible}
        own = [means[str(t.number)] for t in feasible if t.user_attrs.get(LABEL_ATTR) == "incumbent"]
        return bool(own) and max(means.values()) <= own[0]

    return due


def joint_distributions(stage: Stage, env: SpaceEnv) -> dict[str, CategoricalDistribution]:
    """The joint stage's search space (for samplers that need it up front, such as CatCMA)."""
    from optuna.distributions import CategoricalDistribution

    incumbent = incumbent_of(stage, env.decisions)
    assert incumbent is not None
    choices = joint_choices(stage, incumbent, env).slots
    return {slot: CategoricalDistribution(donors) for slot, donors in choices.items()}


class _JointDonors(DecisionKind):
    joint = True
    plots_trials = True
    report_plot = "pareto"

    def decision(self, config: StudyConfig) -> SwapDecision:
        raise NotImplementedError

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = self.decision(config)
        if d.mode == "greedy" and d.then_joint:  # after the greedy stages
            return [planned(self.stage_kinds[0], n_trials=d.then_joint)]
        if d.mode == "joint":
            return [planned(self.stage_kinds[0], n_trials=d.n_trials)]
        return []

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return joint_space(stage, incumbent, env)

    def sampler_name(self, config: StudyConfig) -> str | None:
        return self.decision(config).sampler

    def distributions(self, stage: Stage, env: SpaceEnv) -> dict[str, Any]:
        return dict(joint_distributions(stage, env))


class JointLayersKind(_JointDonors):
    """``decisions.layers: joint`` (or ``then_joint``): every layer's donor in one search."""

    stage_kinds = ("joint-layers",)
    order = 40

    def decision(self, config: StudyConfig) -> SwapDecision:
        return config.decisions.layers


class JointUnitsKind(_JointDonors):
    """``decisions.tensors: joint`` (or ``then_joint``): every unit's donor in one search."""

    stage_kinds = ("joint-units",)
    order = 60

    def decision(self, config: StudyConfig) -> SwapDecision:
        return config.decisions.tensors


register_kind(JointLayersKind())
register_kind(JointUnitsKind())
