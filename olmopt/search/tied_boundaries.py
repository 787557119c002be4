"""``decisions.boundary: {mode: joint, donors: tied}``: the boundaries a joint layer stage chooses among.

``base: auto`` keeps the pool model with the best search mean, and with every layer searched afterwards
the base contributes only its boundary (embeddings, final norm, head), which no layer choice can replace.
That pick is often inside evaluation noise: on the AMD small mistral zoo the full specialist spec_mc
(0.353) led two other boundaries by 0.018 and 0.020, within its 95 % half-width of 0.024, and the merge
the zoo was built from sits on one of those. With ``donors: tied`` the joint stage's boundary slot offers
the boundary of every base candidate tied with the winner in that sense, one donor per distinct set of
boundary weights (a layer specialist's boundary is its base's, so offering both would only split the
sampler's density over one choice); when that leaves one, the joint stage has no boundary slot at all.
The rule reads only the base stage's stored decision and the pool's tensors, so a resumed or second
worker sees the same offer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from olmopt.confidence import mean_with_interval, proportion_counts
from olmopt.search.decision import decision_of_kind

if TYPE_CHECKING:
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.pool.model_pool import ModelPool
    from olmopt.search.decision import Decision
    from olmopt.search.kind import SpaceEnv


@dataclass(frozen=True)
class BoundaryOffer:
    """What a joint stage's boundary slot offers: ``offered`` (the incumbent's boundary first, then the
    tied ones, best search mean first), ``same_as`` (pool model -> the offered donor whose boundary
    weights it has) and ``tied`` (base candidate -> its search mean)."""

    offered: list[str]
    same_as: dict[str, str] = field(default_factory=dict)
    tied: dict[str, float] = field(default_factory=dict)


def tied_with_winner(
    decision: Decision, counts: Mapping[str, int], directions: Mapping[str, str], metric_of: Mapping[str, str]
) -> dict[str, float]:
    """Candidates of ``decision`` (feasible, scored on every item) whose mean over the objectives is at
    least the winner's minus the half-width of the winner's 95 % interval (``mean_with_interval``, each
    objective a share of its ``counts`` items): label -> mean, best first. Empty when that interval is not
    defined (an objective minimised or not an accuracy-like share) or the winner is not a candidate."""
    shares = proportion_counts(metric_of, counts)
    means: dict[str, float] = {}
    for label, candidate in decision.candidates.items():
        values = [candidate.metrics[o] for o in directions if o in candidate.metrics]
        if candidate.feasible and label not in decision.pruned and values:
            means[label] = sum(values) / len(values)
    if decision.winner not in means:
        return {}
    winner = decision.candidates[decision.winner]
    interval = mean_with_interval(
        {o: winner.metrics[o] for o in directions if o in winner.metrics}, dict(directions), shares
    )
    if interval is None or math.isnan(interval[1]):
        return {}
    floor = interval[0] - interval[1]
    tied = {label: m for label, m in means.items() if m >= floor}
    return dict(sorted(tied.items(), key=lambda kv: -kv[1]))


def boundary_digest(pool: ModelPool, adapter: ArchitectureAdapter, param_names: list[str], model: str) -> str:
    """``model``'s ``ModelPool.weights_digest`` over its boundary (every parameter outside the layers: the
    embeddings, final norm and an untied head), so two models with the same boundary weights share it."""
    return pool.weights_digest(model, [n for n in param_names if adapter.layer_of(n) is None])


def tied_boundaries(env: SpaceEnv, own: str) -> BoundaryOffer:
    """The boundary offer of a joint layer stage whose incumbent takes its boundary from ``own``: the base
    decision's candidates tied with its winner (``tied_with_winner`` on the search split), one per
    distinct boundary digest; ``offered`` is ``[own]`` alone when none differs from it. ``own`` may be the
    incumbent's parameter-space merge (``@merge``), whose boundary is no pool model's."""
    from olmopt.search.context import directions_of

    base = decision_of_kind(env.decisions, "base")
    tied: dict[str, float] = {}
    if base is not None:
        metric_of = {o.name: o.metric for o in env.context.objectives}
        tied = tied_with_winner(base, env.context.item_counts("search"), directions_of(env.config), metric_of)
    digests: dict[str, str] = {}

    def digest(model: str) -> str:
        if model not in digests:  # the parameter-space merge (``@merge``) has a boundary of its own
            pooled = model in env.pool_names
            digests[model] = (
                boundary_digest(env.pool, env.adapter, env.param_names, model) if pooled else model
            )
        return digests[model]

    by_digest = {digest(own): own}
    for model in tied:
        by_digest.setdefault(digest(model), model)
    if len(by_digest) == 1:
        return BoundaryOffer(offered=[own], tied=tied)
    same_as = {m: by_digest[digest(m)] for m in env.pool_names if digest(m) in by_digest}
    return BoundaryOffer(offered=list(by_digest.values()), same_as=same_as, tied=tied)
