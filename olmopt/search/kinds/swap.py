"""Greedy swap decisions: the base model, the boundary donor, layer and block donors, unit donors.

A greedy stage has a finite candidate set around the incumbent: every pool model's version of one slot
(base, boundary, a layer, a block of adjacent layers, a tensor unit). Layer and unit decisions may run
several sweeps (``passes``); a later sweep after one that changed nothing costs no evaluation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from olmopt.recipe import MERGE_DONOR, Recipe
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind

if TYPE_CHECKING:
    from optuna.trial import Trial

    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.search.decision import Decision

T = TypeVar("T")


# -- slots ---------------------------------------------------------------------------------------------
def layer_slots(layers: list[int], width: int, direction: str) -> list[tuple[str, str]]:
    """Greedy layer slots: ``("layer", "i")`` for width 1, else ``("block", "i-j")`` for every window of
    ``width`` adjacent searched layers (stride 1), in traversal order."""
    runs: list[list[int]] = []
    for i in layers:  # windows never span a gap in ``layers.only``
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    slots: list[tuple[str, str]] = []
    for run in runs:
        for start in range(len(run) - width + 1):
            window = run[start : start + width]
            slots.append(("layer", str(window[0])) if width == 1 else ("block", f"{window[0]}-{window[-1]}"))
    return list(reversed(slots)) if direction == "backward" else slots


def block_layers(target: str) -> list[int]:
    """The layers of a block target ``"i-j"``."""
    first, _, last = target.partition("-")
    return list(range(int(first), int(last) + 1))


def tensor_units(config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[str]:
    """Units searched by tensor stages: OLM grouping, norms skipped if asked, optional layer filter."""
    t = config.decisions.tensors
    units = adapter.all_units(param_names)
    if t.skip_norm:
        units = [u for u in units if not any("norm" in part for part in u.split("."))]
    if t.only is not None:
        wanted = set(t.only)
        units = [u for u in units if adapter.layer_of(u + ".weight") in wanted]
    return list(reversed(units)) if t.direction == "backward" else units


def donor_pool(pool_names: list[str], incumbent: Recipe | None) -> list[str]:
    """The donors a donor-choice stage offers (Sakana's PS then layers): the pool and, when the incumbent
    holds a parameter-space merge, ``MERGE_DONOR`` (the merged model's own layers, units or boundary)."""
    names = list(pool_names)
    if incumbent is not None and incumbent.param_merge is not None:
        names.append(MERGE_DONOR)
    return names


def incumbent_of(stage: Stage, decisions: Mapping[str, Decision]) -> Recipe | None:
    """The Recipe the runner hands ``stage`` as its incumbent (the last decision before it), for hooks that
    see only the campaign's decisions (a sampler's search space declared up front)."""
    earlier = [key for key in decisions if int(key.split("-", 1)[0]) < stage.index]
    if not earlier:
        return None
    last = max(earlier, key=lambda key: int(key.split("-", 1)[0]))
    return decisions[last].recipe


BOUNDARY_SLOT = "boundary"  # a joint stage's slot for the boundary donor (``decisions.boundary: joint``)


def apply_choice(incumbent: Recipe, slot: str, donor: str) -> Recipe:
    """``incumbent`` with ``slot`` (``layer.{i}``, ``unit.{name}`` or ``boundary``) taken from ``donor``."""
    if slot == BOUNDARY_SLOT:
        return incumbent.model_copy(update={"boundary": donor})
    kind, _, target = slot.partition(".")
    return incumbent.with_layer(int(target), donor) if kind == "layer" else incumbent.with_unit(target, donor)


def current_donor(incumbent: Recipe, slot: str, adapter: ArchitectureAdapter) -> str:
    """The donor that supplies ``slot`` in the incumbent (what "keep" means): a pool model, or
    ``MERGE_DONOR`` where the incumbent's parameter-space merge supplies it."""
    default = MERGE_DONOR if incumbent.param_merge is not None else incumbent.base
    if slot == BOUNDARY_SLOT:
        return incumbent.boundary_donor
    kind, _, target = slot.partition(".")
    if kind == "layer":
        return incumbent.layers.get(int(target), default)
    if target in incumbent.units:
        return incumbent.units[target]
    layer = adapter.layer_of(target + ".weight")
    if layer is not None:
        return incumbent.layers.get(layer, default)
    if incumbent.boundary and target in (*adapter.boundary_units(), adapter.lm_head):
        return incumbent.boundary
    return default


def searched_layers(config: StudyConfig, adapter: ArchitectureAdapter) -> list[int]:
    """The layer indices the layer decision searches: ``decisions.layers.only``, else every layer."""
    return sorted(config.decisions.layers.only or range(adapter.num_layers))


def layer_runs(layers: list[T], blocks: int) -> list[list[T]]:
    """``layers`` cut into ``blocks`` runs of adjacent ones (fewer when there are fewer layers), the lower
    ones first, sizes differing by at most one and the larger runs first."""
    size, extra = divmod(len(layers), blocks)
    runs, start = [], 0
    for i in range(min(blocks, len(layers))):
        end = start + size + (i < extra)
        runs.append(layers[start:end])
        start = end
    return runs


POLISH_PREFIX = "polish-"  # a greedy sweep after a joint stage (kinds/polish.py): the same slots


def slot_kind(stage: Stage) -> str:
    """The kind of slot a greedy stage swaps: ``layer``, ``block``, ``unit``, ``boundary`` or ``base`` (a
    polish stage swaps its unprefixed kind's)."""
    return stage.kind.removeprefix(POLISH_PREFIX)


def greedy_candidates(stage: Stage, incumbent: Recipe | None, pool: list[str]) -> dict[str, Recipe]:
    """Candidate label (a donor name) -> Recipe, for a greedy stage."""
    if stage.kind == "base":
        return {m: Recipe(base=m) for m in pool}
    assert incumbent is not None
    if slot_kind(stage) == "boundary":
        return {m: apply_choice(incumbent, BOUNDARY_SLOT, m) for m in pool}
    if stage.kind == "block":
        out: dict[str, Recipe] = {}
        for m in pool:
            recipe = incumbent
            for layer in block_layers(stage.target):
                recipe = recipe.with_layer(layer, m)
            out[m] = recipe
        if incumbent not in out.values():  # a block of mixed donors: keeping it is a candidate too
            out["incumbent"] = incumbent
        return out
    slot = f"{'layer' if slot_kind(stage) == 'layer' else 'unit'}.{stage.target}"
    return {m: apply_choice(incumbent, slot, m) for m in pool}


def keeps_merge(stage: Stage, incumbent: Recipe, adapter: ArchitectureAdapter) -> bool:
    """Whether the incumbent already takes the stage's slot from its parameter-space merge (so the
    ``MERGE_DONOR`` candidate is the incumbent)."""
    if slot_kind(stage) == "boundary":
        return incumbent.boundary in (None, MERGE_DONOR)
    if stage.kind == "block":
        slots = [f"layer.{i}" for i in block_layers(stage.target)]
    else:
        slots = [f"{'layer' if slot_kind(stage) == 'layer' else 'unit'}.{stage.target}"]
    return all(current_donor(incumbent, slot, adapter) == MERGE_DONOR for slot in slots)


def prefix_layer(stage: Stage, adapter: ArchitectureAdapter) -> int | None:
    """Layer whose incoming hidden states are shared by every candidate of the stage."""
    if slot_kind(stage) == "layer":
        return int(stage.target)
    if stage.kind == "block":
        return block_layers(stage.target)[0]
    if slot_kind(stage) == "unit":
        return adapter.layer_of(stage.target + ".weight")
    return None


# -- the stage space -------------------------------------------------------------------------------------
def swap_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    """Greedy stage: every pool model's version of one slot (a layer, a block of layers, a unit ...), and
    the parameter-space merge's (``MERGE_DONOR``) when the incumbent holds one.

    In a later sweep, when the whole previous sweep changed nothing, the only candidate is the incumbent
    (its metrics are reused, so the stage costs no evaluation)."""
    pool = env.pool_names if stage.kind == "base" else donor_pool(env.pool_names, incumbent)
    if stage.kind == "base" and env.config.decisions.base.mode == "fixed":
        pool = [env.config.base_model]  # a fixed base is scored once: the reference for improve_all
    if incumbent is not None and stage.sweep > 1 and not previous_sweep_changed(stage, env):
        candidates = {"incumbent": incumbent}
    else:
        candidates = greedy_candidates(stage, incumbent, pool)
        if incumbent is not None and MERGE_DONOR in candidates and keeps_merge(stage, incumbent, env.adapter):
            candidates[MERGE_DONOR] = incumbent  # the same weights: keeping the slot, preferred on ties

    def decode(trial: Trial) -> tuple[str, Recipe]:
        label = str(trial.suggest_categorical("donor", list(candidates)))
        return label, candidates[label]

    return StageSpace(
        decode=decode,
        enqueue=[(label, {"donor": label}) for label in candidates],
        layer=prefix_layer(stage, env.adapter),
        significant_boundary_switch=stage.kind == POLISH_PREFIX + "boundary"
        and env.config.decisions.boundary.switch == "significant",
    )


_SWEEP_KEY = re.compile(r"^\d+-((?:polish-)?(?:layer|block|unit|boundary))(?:-.+?)??(?:-pass(\d+))?$")
# the stage kinds whose sweeps are compared with each other, by stage kind
_SWEEP_FAMILIES = {
    "layer": {"layer", "block"},
    "block": {"layer", "block"},
    "unit": {"unit"},
    "polish-layer": {"polish-layer", "polish-boundary"},
    "polish-boundary": {"polish-layer", "polish-boundary"},
    "polish-unit": {"polish-unit"},
}


def previous_sweep_changed(stage: Stage, env: SpaceEnv) -> bool:
    """Whether the previous sweep over the same slots (layers and blocks, or units) changed the recipe:
    its last decision against the decision just before it began, compared as weights."""
    from olmopt.patch import model_key  # torch: only where trials run

    family = _SWEEP_FAMILIES.get(stage.kind, {stage.kind})
    keys = sorted(env.decisions, key=lambda k: int(k.split("-", 1)[0]))
    before: str | None = None
    first = last = None
    for key in keys:
        if int(key.split("-", 1)[0]) >= stage.index:
            break
        match = _SWEEP_KEY.match(key)
        in_previous = (
            match is not None and match.group(1) in family and int(match.group(2) or 1) == stage.sweep - 1
        )
        if in_previous:
            first = first or key
            last = key
        elif first is None:
            before = key
    if first is None or last is None or before is None:
        return True  # nothing to compare with: search
    recipes = [env.decisions[k].recipe for k in (before, last)]
    keys_ = [model_key(r, env.adapter, env.param_names, env.pool) for r in recipes]
    return keys_[0] != keys_[1]


# -- the kinds -------------------------------------------------------------------------------------------
class _SwapKind(DecisionKind):
    """A greedy swap: every enqueued candidate is evaluated, Copeland decides."""

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return swap_space(stage, incumbent, env)


class BaseKind(_SwapKind):
    """``decisions.base``: the base model (the fixed one, or every pool model), always the first stage."""

    stage_kinds = ("base",)
    order = 0

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        return [planned("base")]

    def olm_report(self, stage: Stage, decision: Decision) -> dict[str, Any]:
        return {"base_model": {"name": decision.winner, "metrics": decision.metrics}}


class BoundaryKind(_SwapKind):
    """``decisions.boundary: greedy``: the donor of the embeddings, final norm and head."""

    stage_kinds = ("boundary",)
    order = 20

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        return [planned("boundary")] if config.decisions.boundary.mode == "greedy" else []

    def olm_report(self, stage: Stage, decision: Decision) -> dict[str, Any]:
        return {"boundary_layers": {"name": decision.winner, "metrics": decision.metrics}}


class LayerKind(_SwapKind):
    """``decisions.layers: greedy``: one stage per layer (``layer``) or window of layers (``block``), per
    width of ``windows``, per sweep of ``passes``."""

    stage_kinds = ("layer", "block")
    order = 30

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.layers
        if d.mode != "greedy":
            return []
        layers = sorted(d.only or range(adapter.num_layers))
        return [
            planned(kind, target, sweep=sweep)
            for sweep in range(1, d.passes + 1)
            for width in d.windows
            for kind, target in layer_slots(layers, width, d.direction)
        ]

    def olm_report(self, stage: Stage, decision: Decision) -> dict[str, Any]:
        """One layer's candidates (OLM has no section for blocks)."""
        if stage.kind != "layer":
            return {}
        return {
            "layers": {stage.target: {"metrics": decision.candidate_metrics(), "best_model": decision.winner}}
        }


class UnitKind(_SwapKind):
    """``decisions.tensors: greedy``: one stage per tensor unit, per sweep of ``passes``."""

    stage_kinds = ("unit",)
    order = 50

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.tensors
        if d.mode != "greedy":
            return []
        units = tensor_units(config, adapter, param_names)
        return [planned("unit", unit, sweep=sweep) for sweep in range(1, d.passes + 1) for unit in units]

    def olm_report(self, stage: Stage, decision: Decision) -> dict[str, Any]:
        best = {"metrics": decision.candidate_metrics(), "best_model": decision.winner}
        return {"tensors": {f"{stage.target}.weight": best}}


for _kind in (BaseKind(), BoundaryKind(), LayerKind(), UnitKind()):
    register_kind(_kind)
