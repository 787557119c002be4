"""Task arithmetic: ``base + lambda * sum_i w_i (v_i - base)`` (``/ sum w`` when ``normalize``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch


@merge_method(
    "task_arithmetic",
    summary="base + lambda * sum_i w_i (variant_i - base), divided by sum w when normalize",
    params=(
        Param("weights", 1.0, per_variant=True, aliases=("weight",), help="weight per variant"),
        Param("lambda", 1.0, search=(0.05, 1.0), help="scale of the merged delta"),
        Param("normalize", False, kind="bool", help="divide by the sum of the weights"),
    ),
)
def task_arithmetic(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """Task arithmetic of one tensor (maths in ``olmopt.methods.delta.della_maths.task_arithmetic_merge``)."""
    from olmopt.methods.delta.della_maths import TaskArithmeticParams, task_arithmetic_merge

    params = TaskArithmeticParams(weights=p["weights"], lambda_=p["lambda"], normalize=p["normalize"])
    return task_arithmetic_merge(base, list(variants), params, seed, name, chunk_elems)
