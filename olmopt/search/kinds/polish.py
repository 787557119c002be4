"""``decisions.layers/tensors.polish``: greedy sweeps over single slots after a joint stage.

A model-based search over every slot at once (TPE, CatCMA) finds the region of a good merge quickly but
rarely pins every slot within its budget: on the small zoo a 100-trial joint search found the lower
specialist's layers and missed one of the upper specialist's two, one swap away from the ground truth.
A polish sweep tries every donor of one slot at a time from the joint winner, as OLM's traversal does,
where each step is a small, certain gain. Candidates whose weights repeat a known model reuse its
metrics, and a sweep after one that changed nothing costs no evaluation (``swap.swap_space``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olmopt.config import has_joint_stage
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind
from olmopt.search.kinds.swap import POLISH_PREFIX, layer_slots, swap_space, tensor_units

if TYPE_CHECKING:
    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.recipe import Recipe


class _Polish(DecisionKind):
    """Greedy single-slot sweeps (``polish`` of them) after the joint stage of the same decision."""

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return swap_space(stage, incumbent, env)


class PolishLayersKind(_Polish):
    """``decisions.layers: {mode: joint, polish: N}`` (or greedy with ``then_joint``): N sweeps over single
    layers after joint-layers, each led by the boundary when the joint stage searched every pool model's
    (``boundary: {mode: joint, donors: all}``)."""

    stage_kinds = (POLISH_PREFIX + "layer", POLISH_PREFIX + "boundary")
    order = 45  # after joint-layers (40), before the tensor-unit decisions

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.layers
        if not has_joint_stage(d):
            return []
        layers = sorted(d.only or range(adapter.num_layers))
        boundary = config.decisions.boundary
        slots = [(self.stage_kinds[1], "")] if (boundary.mode, boundary.donors) == ("joint", "all") else []
        slots += [(self.stage_kinds[0], target) for _, target in layer_slots(layers, 1, d.direction)]
        return [
            planned(kind, target, sweep=sweep) for sweep in range(1, d.polish + 1) for kind, target in slots
        ]


class PolishUnitsKind(_Polish):
    """``decisions.tensors: {mode: joint, polish: N}`` (or greedy with ``then_joint``): N sweeps over tensor
    units after joint-units."""

    stage_kinds = (POLISH_PREFIX + "unit",)
    order = 65  # after joint-units (60)

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.tensors
        if not has_joint_stage(d):
            return []
        units = tensor_units(config, adapter, param_names)
        return [
            planned(self.stage_kinds[0], unit, sweep=sweep)
            for sweep in range(1, d.polish + 1)
            for unit in units
        ]


register_kind(PolishLayersKind())
register_kind(PolishUnitsKind())
