"""Linear: the weighted average of the base and the variants (mergekit's ``linear``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.errors import InputError
from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch


def _check(p: Mapping[str, Any], count: int) -> None:
    if p["normalize"] and abs(math.fsum((p["base_weight"], *p["weights"]))) < 1e-8:
        raise InputError(
            "linear: weights sum to zero (base_weight + weights); set normalize false or change them"
        )


@merge_method(
    "linear",
    summary="weighted average: (base_weight * base + sum_i w_i v_i) / (base_weight + sum w)",
    params=(
        Param(
            "weights",
            1.0,
            per_variant=True,
            aliases=("weight",),
            search=(0.0, 1.0),
            help="weight per variant",
        ),
        Param("base_weight", 1.0, search=(0.05, 1.0), help="weight of the base model"),
        Param("normalize", True, kind="bool", help="divide by the sum of all weights"),
    ),
    check=_check,
)
def linear(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """Weighted average of one tensor across the base and the variants."""
    import torch

    from olmopt.methods.delta._kernels import f32, flatten, spans

    weights = p["weights"]
    total = math.fsum((p["base_weight"], *weights)) if p["normalize"] else 1.0
    flat_base, flats = flatten(base, variants)
    out = torch.empty_like(flat_base)
    for start, stop in spans(flat_base.numel(), chunk_elems):
        acc = f32(flat_base, start, stop).mul_(p["base_weight"])
        for flat, weight in zip(flats, weights, strict=True):
            acc.add_(f32(flat, start, stop), alpha=weight)
        out[start:stop] = acc.div_(total)
    return out.reshape(base.shape)
