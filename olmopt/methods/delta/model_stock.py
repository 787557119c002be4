"""Model Stock: interpolate between the base and the variants' average by their mean pairwise cosine."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch


def stock_ratio(count: int, cos: float) -> float:
    """``t = N cos / (1 + (N - 1) cos)``; 0 (keep the base) where the denominator vanishes."""
    denominator = 1.0 + (count - 1) * cos
    return 0.0 if abs(denominator) < 1e-12 else count * cos / denominator


def mean_cosine(g: Sequence[Sequence[float]]) -> float:
    """Mean pairwise cosine of the task vectors from their Gram matrix (norm product floored at 1e-6)."""
    count = len(g)
    values = [
        max(-1.0, min(1.0, g[i][j] / max(math.sqrt(g[i][i]) * math.sqrt(g[j][j]), 1e-6)))
        for i in range(count)
        for j in range(i + 1, count)
    ]
    return math.fsum(values) / len(values)


@merge_method(
    "model_stock",
    summary="Model Stock: t = N cos / (1 + (N-1) cos); t * mean(variants) + (1 - t) * base",
    params=(Param("filter_wise", False, kind="bool", help="one ratio per row instead of per tensor"),),
    min_variants=2,
)
def model_stock(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """Model Stock of one tensor (needs two variants or more: three models with the base)."""
    import torch

    from olmopt.methods.delta._kernels import f32, flatten, gram, row_gram, spans
    from olmopt.methods.delta.della_maths import as_rows

    count = len(variants)
    if p["filter_wise"]:
        rows_base = as_rows(base)
        rows_variants = [as_rows(v) for v in variants]
        rows, cols = rows_base.shape
        out = torch.empty_like(rows_base)
        step = max(1, int(chunk_elems) // max(cols, 1))
        for row in range(0, rows, step):
            stop = min(rows, row + step)
            base64 = rows_base[row:stop].to(torch.float64)
            g = row_gram([v[row:stop].to(torch.float64) - base64 for v in rows_variants])
            norms = torch.diagonal(g, dim1=1, dim2=2).sqrt()
            pairs = [
                (g[:, i, j] / (norms[:, i] * norms[:, j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
                for i in range(count)
                for j in range(i + 1, count)
            ]
            cos = torch.stack(pairs).mean(0)
            denominator = cos.mul(count - 1).add_(1.0)
            ratio = torch.where(denominator.abs() < 1e-12, 0.0, cos * count / denominator).to(torch.float32)
            ratio = ratio.unsqueeze(1)
            average = torch.stack([v[row:stop].to(torch.float32) for v in rows_variants]).sum(0).div_(count)
            out[row:stop] = average.mul_(ratio).add_(base64.to(torch.float32).mul_(1.0 - ratio))
        return out.reshape(base.shape)
    flat_base, flats = flatten(base, variants)
    t = stock_ratio(count, mean_cosine(gram(flats, subtract=flat_base)))
    out = torch.empty_like(flat_base)
    for start, stop in spans(flat_base.numel(), chunk_elems):
        average = f32(flats[0], start, stop)
        for flat in flats[1:]:
            average.add_(f32(flat, start, stop))
        out[start:stop] = average.div_(count).mul_(t).add_(f32(flat_base, start, stop).mul_(1.0 - t))
    return out.reshape(base.shape)
