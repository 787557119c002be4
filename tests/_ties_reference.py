"""Frozen oracle: TIES and DARE-TIES as olmopt computed them before the fast kernels (commit 0438eb0).

Radix top-k with boolean masks, sign election by mask arithmetic; tests/test_ties_speed.py checks that
``olmopt.methods.delta`` gives the same bits. Do not "fix" this file: it is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from olmopt.methods.delta.seeded_uniform import INT16_OFFSET, LEVELS, stream_key, uniform_int16


def _spans(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, chunk):
        yield start, min(numel, start + chunk)


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], dtype=torch.int64))[0])
    index = counts.numel() - 1 - position
    return index, int(from_top[position]) - int(counts[index])


class _TopK:
    def __init__(self, chunks: Callable[[], Iterator[torch.Tensor]], k: int, numel: int) -> None:
        self.k, self.numel, self.seen_ties, self.threshold, self.ties_needed = k, numel, 0, 0, 0
        if 0 < k < numel:
            high_counts = torch.zeros(1 << 15, dtype=torch.int64)
            for magnitude in chunks():
                high_counts += torch.bincount(magnitude.view(torch.int32) >> 16, minlength=1 << 15)
            high, above = _from_top(high_counts, k)
            low_counts = torch.zeros(1 << 16, dtype=torch.int64)
            for magnitude in chunks():
                bits = magnitude.view(torch.int32)
                low_counts += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
            low, above_low = _from_top(low_counts, k - above)
            self.threshold, self.ties_needed = (high << 16) | low, k - above - above_low

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        if self.k <= 0:
            return torch.zeros_like(magnitude)
        if self.k >= self.numel:
            return torch.ones_like(magnitude)
        bits = magnitude.view(torch.int32)
        ties = bits == self.threshold
        count = int(ties.sum())
        if self.seen_ties + count <= self.ties_needed:
            keep = bits >= self.threshold
        else:
            keep = bits > self.threshold
            if self.seen_ties < self.ties_needed:
                rank = ties.to(torch.int64).cumsum(0).add_(self.seen_ties)
                keep |= ties & (rank <= self.ties_needed)
        self.seen_ties += count
        return keep.to(torch.float32)


def _mix(weighted: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    majority = torch.stack(weighted).sum(0).sign_().add_(0.5).sign_()
    mixed = torch.zeros_like(majority)
    divisor = torch.zeros_like(majority)
    for tensor, weight in zip(weighted, weights, strict=True):
        agree = tensor.sign().mul_(majority).clamp_(min=0.0)
        mixed.addcmul_(tensor, agree)
        if normalize:
            divisor.add_(agree, alpha=weight)
    if not normalize:
        return mixed
    divisor.add_(1.0 - divisor.abs().sign())
    return mixed.div_(divisor)


def _merge(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    weights: Sequence[float],
    sparsify: Sequence[Callable[[torch.Tensor, int], torch.Tensor]],
    normalize: bool,
    scale: float,
    chunk: int,
) -> torch.Tensor:
    flat_base, flats = base.reshape(-1), [v.reshape(-1) for v in variants]
    out = torch.empty_like(flat_base)
    for start, stop in _spans(flat_base.numel(), chunk):
        base32 = flat_base[start:stop].to(torch.float32, copy=True)
        weighted = []
        for flat, weight, cut in zip(flats, weights, sparsify, strict=True):
            delta = cut(flat[start:stop].to(torch.float32, copy=True).sub_(base32), start)
            weighted.append(delta.mul_(weight))
        out[start:stop] = base32.add_(_mix(weighted, weights, normalize), alpha=scale)
    return out.reshape(base.shape)


def ties(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool = True,
    scale: float = 1.0,
    chunk: int = 1 << 18,
) -> torch.Tensor:
    flat_base = base.reshape(-1)
    numel = flat_base.numel()
    cuts = []
    for variant, density in zip(variants, densities, strict=True):
        flat = variant.reshape(-1)
        if density >= 1.0:
            cuts.append(lambda delta, start: delta)
            continue

        def chunks(flat: torch.Tensor = flat) -> Iterator[torch.Tensor]:
            for start, stop in _spans(numel, chunk):
                yield flat[start:stop].to(torch.float32, copy=True).sub_(flat_base[start:stop].float()).abs_()

        top = _TopK(chunks, int(density * numel), numel)
        cuts.append(lambda delta, start, top=top: delta.mul_(top.mask(delta.abs())))
    return _merge(base, variants, weights, cuts, normalize, scale, chunk)


def dare_ties(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seed: int,
    name: str,
    normalize: bool = False,
    rescale: bool = True,
    scale: float = 1.0,
    chunk: int = 1 << 18,
) -> torch.Tensor:
    def bernoulli(density: float, index: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
        key = stream_key(seed, name, index)

        def cut(delta: torch.Tensor, start: int) -> torch.Tensor:
            if density >= 1.0:
                return delta
            draws = uniform_int16(key, start, start + delta.numel()).to(torch.float32)
            keep = draws.neg_().add_(LEVELS * density - INT16_OFFSET - 0.5).sign_().clamp_(min=0.0)
            kept = delta.mul_(keep)
            return kept.div_(density) if rescale else kept

        return cut

    cuts = [bernoulli(density, index) for index, density in enumerate(densities)]
    assert math.isfinite(scale)
    return _merge(base, variants, weights, cuts, normalize, scale, chunk)
