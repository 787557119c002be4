"""The stage plan of a campaign, asked of the registered decision kinds (no Optuna here).

Each registered :class:`~olmopt.search.kind.DecisionKind` plans its own stages from the study file;
the plan is their stages in the kinds' ``order``, numbered. The greedy slot helpers live with their
kind (``olmopt.search.kinds.swap``) and are re-exported here.
"""

from __future__ import annotations

from dataclasses import replace

from olmopt.config import StudyConfig
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.search.kind import Stage
from olmopt.search.kinds import registered
from olmopt.search.kinds.joint import joint_slots
from olmopt.search.kinds.swap import (
    apply_choice,
    block_layers,
    current_donor,
    greedy_candidates,
    layer_slots,
    prefix_layer,
    tensor_units,
)

__all__ = [
    "Stage",
    "apply_choice",
    "block_layers",
    "current_donor",
    "greedy_candidates",
    "joint_slots",
    "layer_slots",
    "plan_stages",
    "prefix_layer",
    "tensor_units",
]


def plan_stages(config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
    """Every stage in execution order: each registered kind's stages, kinds in ``order``."""
    stages = [stage for kind in registered() for stage in kind.plan(config, adapter, param_names)]
    return [replace(stage, index=i) for i, stage in enumerate(stages)]
