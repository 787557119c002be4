"""DELLA (rank-based magnitude sampling + sign election) and plain task arithmetic.

DELLA (Deep, Zhang et al. 2024; mergekit's ``della``): per row of each task vector, elements are ranked
by magnitude and kept with probability ``density - eps + 2*eps*rank/(n-1)`` (largest kept most often),
survivors are rescaled by ``1/keep_prob``; weighted deltas then go through TIES-style sign election
(majority sign of the weighted sum), disjoint mean (``normalize``) and ``lambda`` scaling.
``della_linear`` is the same without sign election. Task arithmetic is
``base + lambda * sum_i w_i * (variant_i - base)`` (divided by ``sum w`` when ``normalize``).

Ranks come from one sort per row of packed ``(|delta| bits, column)`` int64 keys (ties broken by
column, so results are deterministic), about 4x cheaper than mergekit's double ``argsort``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from olmopt.errors import InputError
from olmopt.methods.delta._kernels import check_shapes
from olmopt.methods.delta.circuit_maths import DEFAULT_CHUNK_ELEMS
from olmopt.methods.delta.seeded_uniform import INT16_OFFSET, LEVELS, stream_key, uniform_int16

PerVariant = float | tuple[float, ...]


def per_variant(value: PerVariant, count: int, label: str) -> list[float]:
    """Broadcast a scalar to ``count`` values, or check a per-variant list has ``count`` entries."""
    if isinstance(value, int | float):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise InputError(f"{label}: got {len(values)} values for {count} variants")
    return values


@dataclass(frozen=True)
class DellaParams:
    """DELLA knobs; ``density``/``epsilon``/``weights`` are a scalar or one value per variant."""

    density: PerVariant = 0.5
    epsilon: PerVariant = 0.15
    weights: PerVariant = 1.0
    lambda_: float = 1.0
    normalize: bool = True
    rescale: bool = True
    sign_election: bool = True

    def resolved(self, count: int) -> tuple[list[float], list[float], list[float]]:
        densities = per_variant(self.density, count, "della density")
        epsilons = per_variant(self.epsilon, count, "della epsilon")
        weights = per_variant(self.weights, count, "della weights")
        for density, eps in zip(densities, epsilons, strict=True):
            if not 0.0 < density <= 1.0:
                raise InputError(f"della: density must be in (0, 1], got {density}")
            if eps < 0.0 or (density < 1.0 and not (density - eps > 0.0 and density + eps <= 1.0)):
                raise InputError(
                    f"della: epsilon {eps} must keep density +/- epsilon within (0, 1] (density {density})"
                )
        return densities, epsilons, weights


@dataclass(frozen=True)
class TaskArithmeticParams:
    """Task arithmetic: ``base + lambda * sum w_i delta_i`` (``/ sum w`` when ``normalize``)."""

    weights: PerVariant = 1.0
    lambda_: float = 1.0
    normalize: bool = False


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View as (rows, cols): first dim x the rest; 0-D and 1-D tensors are one row."""
    if tensor.dim() < 2:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-row keep probability from the magnitude rank: ``density - eps + 2 eps rank/(n-1)``."""
    rows, cols = delta.shape
    if cols == 1 or epsilon == 0.0:
        return torch.full_like(delta, density)
    bits = max(1, (cols - 1).bit_length())
    keys = delta.abs().view(torch.int32).to(torch.int64).bitwise_left_shift_(bits)
    keys.bitwise_or_(torch.arange(cols, dtype=torch.int64))
    order = torch.from_numpy(np.sort(keys.numpy(), axis=1)).bitwise_and_((1 << bits) - 1)
    by_rank = torch.linspace(density - epsilon, density + epsilon, cols, dtype=torch.float32)
    probs = torch.empty_like(delta)
    probs.scatter_(1, order, by_rank.expand(rows, cols))
    return probs


def della_prune(
    delta: torch.Tensor, density: float, epsilon: float, key: tuple[int, ...], start: int, rescale: bool
) -> torch.Tensor:
    """DELLA MAGPRUNE of a (rows, cols) float32 chunk whose first element has flat index ``start``."""
    if density >= 1.0:
        return delta
    probs = keep_probabilities(delta, density, epsilon)
    draws = uniform_int16(key, start, start + delta.numel()).to(torch.float32).reshape(delta.shape)
    # keep iff u < prob with u = (draw + 32768.5) / 65536
    keep = torch.mul(probs, LEVELS).sub_(draws).sub_(INT16_OFFSET + 0.5).sign_().clamp_(min=0.0)
    kept = delta.mul_(keep)
    return kept.div_(probs) if rescale else kept


def della_merge(
    base: torch.Tensor,
    variants: list[torch.Tensor],
    params: DellaParams,
    seed: int,
    name: str,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """DELLA-merge one tensor (output in the base dtype), chunked by whole rows."""
    check_shapes(base, variants, name)
    densities, epsilons, weights = params.resolved(len(variants))
    rows_base = as_rows(base)
    rows_variants = [as_rows(v) for v in variants]
    rows, cols = rows_base.shape
    keys = [stream_key(seed, name, index) for index in range(len(variants))]
    out = torch.empty_like(rows_base)
    step = max(1, int(chunk_elems) // max(cols, 1))
    for row in range(0, rows, step):
        stop = min(rows, row + step)
        base32 = rows_base[row:stop].to(torch.float32, copy=True)
        weighted: list[torch.Tensor] = []
        for index, variant in enumerate(rows_variants):
            delta = variant[row:stop].to(torch.float32, copy=True).sub_(base32)
            kept = della_prune(
                delta, densities[index], epsilons[index], keys[index], row * cols, params.rescale
            )
            weighted.append(kept.mul_(weights[index]))
        mixed = _mix(weighted, weights, params)
        out[row:stop] = base32.add_(mixed, alpha=params.lambda_)
    return out.reshape(base.shape)


def _mix(weighted: list[torch.Tensor], weights: list[float], params: DellaParams) -> torch.Tensor:
    if not params.sign_election:
        mixed = torch.stack(weighted).sum(0)
        total = sum(weights)
        return mixed.div_(total) if params.normalize and abs(total) >= 1e-8 else mixed
    summed = torch.stack(weighted).sum(0)
    majority = summed.sign_().add_(0.5).sign_()  # sign of the sum, ties -> +1
    mixed = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority)
    for tensor, weight in zip(weighted, weights, strict=True):
        agree = tensor.sign().mul_(majority).clamp_(min=0.0)
        mixed.addcmul_(tensor, agree)
        if params.normalize:
            divisor.add_(agree, alpha=weight)
    if not params.normalize:
        return mixed
    divisor.add_(1.0 - divisor.abs().sign())  # positions with no contribution divide by 1
    return mixed.div_(divisor)


def task_arithmetic_merge(
    base: torch.Tensor,
    variants: list[torch.Tensor],
    params: TaskArithmeticParams,
    seed: int = 0,
    name: str = "",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """``base + lambda * sum w_i (v_i - base)`` for one tensor, output in the base dtype."""
    del seed  # deterministic method; same signature as the stochastic ones
    check_shapes(base, variants, name)
    weights = per_variant(params.weights, len(variants), "task_arithmetic weights")
    total = sum(weights)
    scale = params.lambda_ / total if params.normalize and abs(total) >= 1e-8 else params.lambda_
    flat_base = base.reshape(-1)
    flats = [v.reshape(-1) for v in variants]
    out = torch.empty_like(flat_base)
    chunk = max(1, int(chunk_elems))
    for start in range(0, flat_base.numel(), chunk):
        base32 = flat_base[start : start + chunk].to(torch.float32, copy=True)
        mixed = torch.zeros_like(base32)
        for flat, weight in zip(flats, weights, strict=True):
            mixed.add_(flat[start : start + chunk].to(torch.float32, copy=True).sub_(base32), alpha=weight)
        out[start : start + chunk] = base32.add_(mixed, alpha=scale)
    return out.reshape(base.shape)


def weights_tuple(values: Sequence[float] | float) -> PerVariant:
    """Normalise YAML/CLI input (scalar or list) to a hashable per-variant value."""
    if isinstance(values, int | float):
        return float(values)
    return tuple(float(v) for v in values)
