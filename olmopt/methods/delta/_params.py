"""Parameter declarations shared by the task-arithmetic family (ties, dare, breadcrumbs); torch-free."""

from __future__ import annotations

from olmopt.methods.registry import Param

WEIGHTS = Param(
    "weights", 1.0, per_variant=True, aliases=("weight",), search=(0.0, 1.0), help="weight per variant"
)
DENSITY = Param(
    "density",
    1.0,
    low=0.0,
    high=1.0,
    low_open=True,
    per_variant=True,
    search=(0.1, 1.0),
    help="keep fraction",
)
LAMBDA = Param("lambda", 1.0, help="scale of the merged delta")
