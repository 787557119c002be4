"""SLERP: spherical interpolation between the base (t =
0) and one variant (t = 1), as mergekit's ``slerp``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch

DOT_THRESHOLD = 0.9995  # |cos| above this: the vectors are nearly colinear, interpolate linearly
EPS = 1e-8


def slerp_coefficients(t: float, norm0: float, norm1: float, dot: float) -> tuple[float, float]:
    """``(s0, s1)`` with ``result = s0 * v0 + s1 * v1`` from the norms and the dot product of v0, v1."""
    # mergekit normalises a vector only when its norm exceeds EPS
    cos = dot / ((norm0 if norm0 > EPS else 1.0) * (norm1 if norm1 > EPS else 1.0))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


@merge_method(
    "slerp",
    summary="spherical interpolation of the flattened base (t=0) and one variant (t=1); lerp when colinear",
    params=(Param("t", 0.5, low=0.0, high=1.0, search=(0.0, 1.0), help="0 = base, 1 = variant"),),
    min_variants=1,
    max_variants=1,
)
def slerp(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """SLERP of one tensor over the whole flattened vectors (norms and angle from a first pass)."""
    import torch

    from olmopt.methods.delta._kernels import f32, flatten, gram, spans

    flat_base, (flat_variant,) = flatten(base, variants)
    g = gram([flat_base, flat_variant])
    s0, s1 = slerp_coefficients(float(p["t"]), math.sqrt(g[0][0]), math.sqrt(g[1][1]), g[0][1])
    out = torch.empty_like(flat_base)
    for start, stop in spans(flat_base.numel(), chunk_elems):
        out[start:stop] = f32(flat_base, start, stop).mul_(s0).add_(f32(flat_variant, start, stop), alpha=s1)
    return out.reshape(base.shape)
