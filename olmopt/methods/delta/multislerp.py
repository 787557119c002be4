"""Multi-SLERP: barycentric spherical interpolation of the variants' task vectors (mergekit's ``multislerp``).

mergekit projects the unit task vectors to the tangent space at their weighted mean ``M``, averages
there and maps back. The weighted tangent average is ``M - <M, M/|M|> M/|M| = 0`` exactly, so the
result is the normalised weighted mean direction scaled by the weighted mean norm; olmopt computes
that closed form (mergekit gets it up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.errors import InputError
from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch


def _check(p: Mapping[str, Any], count: int) -> None:
    if p["normalize_weights"] and abs(math.fsum(p["weights"])) < 1e-8:
        raise InputError("multislerp: weights sum to zero; set normalize_weights false or change them")


def multislerp_coefficients(
    weights: Sequence[float], g: Sequence[Sequence[float]], eps: float
) -> list[float]:
    """``c_i`` with ``result = base + sum_i c_i delta_i``, from the weights and the deltas' Gram matrix."""
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(len(weights))]
    unit = [w / (n + eps) for w, n in zip(weights, norms, strict=True)]
    mean_sq = math.fsum(unit[i] * unit[j] * g[i][j] for i in range(len(unit)) for j in range(len(unit)))
    mean_norm = math.sqrt(max(mean_sq, 0.0))
    if mean_norm < eps:  # directions cancel: fall back to the weighted sum
        return list(weights)
    scale = math.fsum(w * n for w, n in zip(weights, norms, strict=True)) / mean_norm
    return [u * scale for u in unit]


@merge_method(
    "multislerp",
    summary="spherical barycentre of the task vectors, scaled by their weighted mean norm",
    params=(
        Param(
            "weights",
            1.0,
            per_variant=True,
            aliases=("weight",),
            search=(0.05, 1.0),
            help="weight per variant",
        ),
        Param("normalize_weights", True, kind="bool", help="divide the weights by their sum"),
        Param("eps", 1e-8, low=0.0, help="added to norms before dividing"),
    ),
    check=_check,
)
def multislerp(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """Multi-SLERP of one tensor; one variant is returned as is (as mergekit does)."""
    import torch

    from olmopt.methods.delta._kernels import f32, flatten, gram, spans

    if len(variants) == 1:
        return variants[0].to(base.dtype, copy=True)
    weights = list(p["weights"])
    if p["normalize_weights"]:
        total = math.fsum(weights)
        weights = [w / total for w in weights]
    flat_base, flats = flatten(base, variants)
    coefficients = multislerp_coefficients(weights, gram(flats, subtract=flat_base), float(p["eps"]))
    out = torch.empty_like(flat_base)
    for start, stop in spans(flat_base.numel(), chunk_elems):
        base32 = f32(flat_base, start, stop)
        mixed = torch.zeros_like(base32)
        for flat, c in zip(flats, coefficients, strict=True):
            mixed.add_(f32(flat, start, stop).sub_(base32), alpha=c)
        out[start:stop] = base32.add_(mixed)
    return out.reshape(base.shape)
