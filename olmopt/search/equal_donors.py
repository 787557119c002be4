"""Donors that give a slot the same weights are one choice, not several; a donor's own layers are a unit.

A specialist trained in some layers only carries its base's weights everywhere else, bit for bit (every
zoo family's layer specialists share 2 of 4 or 4 of 6 layers with the base). A joint stage offers each
layer or unit slot one donor per distinct set of that slot's weights (``ModelPool.digest``), so the
sampler's density is not split over equal choices and warm starts that would repeat one model collapse
into one. The boundary slot's offer already works this way (search/tied_boundaries.py).

The same digests tell which layers a donor changed: a partial fine-tune (frozen layers, or layers
spliced in) holds its own weights only in the layers it trained, and those are where its skill is.
``own_layers`` names them without reading any model's training record, so warm starts and the base
lookahead can move them as one piece (``warm_own``), wherever they fall.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olmopt.pool.adapter import unit_of
from olmopt.recipe import MERGE_DONOR

if TYPE_CHECKING:
    from olmopt.search.kind import SpaceEnv


def slot_params(slot: str, env: SpaceEnv) -> list[str]:
    """The parameters a ``layer.{i}`` or ``unit.{name}`` slot takes from its donor."""
    kind, _, target = slot.partition(".")
    if kind == "layer":
        return [n for n in env.param_names if env.adapter.layer_of(n) == int(target)]
    return [n for n in env.param_names if unit_of(n) == target]


def distinct_donors(
    slot: str, donors: list[str], own: str, env: SpaceEnv
) -> tuple[list[str], dict[str, str]]:
    """``donors`` (in their order) less each one whose weights in ``slot`` equal another's, and every donor
    -> the offered donor with its weights. ``own`` (the incumbent's donor there) stands for its class; the
    parameter-space merge (``MERGE_DONOR``) is a class of its own. Without a pool on disk (or with no
    parameters in the slot) every donor is offered."""
    names = slot_params(slot, env)
    if env.pool is None or not names:
        return list(donors), {d: d for d in donors}

    weights = {d: d if d == MERGE_DONOR else env.pool.weights_digest(d, names) for d in donors}
    first: dict[str, str] = {}
    for donor in sorted(donors, key=lambda d: d != own):  # own first, the rest in order
        first.setdefault(weights[donor], donor)
    same_as = {d: first[weights[d]] for d in donors}
    return [d for d in donors if same_as[d] == d], same_as


def own_layers(donor: str, layers: list[int], env: SpaceEnv) -> list[int]:
    """The layers among ``layers`` where ``donor``'s weights are no other pool model's: what a partial
    fine-tune changed. Empty when that is every layer (a full fine-tune: its whole model is the warm
    start), for the parameter-space merge, and without a pool on disk."""
    if env.pool is None or donor not in env.pool_names:
        return []
    others = [m for m in env.pool_names if m != donor]
    own = []
    for layer in layers:
        names = slot_params(f"layer.{layer}", env)
        if not names:
            continue
        mine = env.pool.weights_digest(donor, names)
        if all(env.pool.weights_digest(m, names) != mine for m in others):
            own.append(layer)
    return own if len(own) < len(layers) else []
