"""Tensor kernels shared by the delta methods: chunk spans, fixed-block sums, exact top-k, sign election.

Everything here is chunk-independent by construction: whole-tensor sums run over fixed blocks of
``REDUCE_BLOCK`` elements (small enough that torch sums each block on one thread) in float64 and are
added in index order; the top-k threshold is found exactly by a two-pass radix select (TIES finds it
faster in ``trim``, falling back to this one); random masks come from
``olmopt.methods.delta.seeded_uniform``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy
import torch
import torch.nn.functional as F

from olmopt.errors import InputError
from olmopt.methods.delta.seeded_uniform import INT16_OFFSET, LEVELS, stream_key, uniform_int16

REDUCE_BLOCK = 1 << 14  # below torch's parallel grain size (32768): one thread, one summation order
SEQUENTIAL_SUM = 4  # torch.stack(t).sum(0) adds up to this many tensors in index order
NORMAL = float(numpy.finfo(numpy.float32).tiny)  # the smallest normal float32 (denormals divide slowly)


def spans(numel: int, chunk_elems: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` pieces of a flat tensor, ``chunk_elems`` at a time."""
    step = max(1, int(chunk_elems))
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def f32(flat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """A float32 copy of ``flat[start:stop]`` (never a view of the input)."""
    return flat[start:stop].to(torch.float32, copy=True)


def flatten(base: torch.Tensor, variants: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return base.reshape(-1), [v.reshape(-1) for v in variants]


def gram(vectors: Sequence[torch.Tensor], subtract: torch.Tensor | None = None) -> list[list[float]]:
    """Float64 Gram matrix of flat ``vectors`` (minus ``subtract`` when given), summed over fixed blocks."""
    count = len(vectors)
    totals = [[0.0] * count for _ in range(count)]
    numel = vectors[0].numel() if vectors else 0
    for start in range(0, numel, REDUCE_BLOCK):
        stop = min(numel, start + REDUCE_BLOCK)
        block = [v[start:stop].to(torch.float64) for v in vectors]
        if subtract is not None:
            ref = subtract[start:stop].to(torch.float64)
            block = [b - ref for b in block]
        for i in range(count):
            for j in range(i, count):
                totals[i][j] += float((block[i] * block[j]).sum())
    for i in range(count):
        for j in range(i):
            totals[i][j] = totals[j][i]
    return totals


def row_gram(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row float64 Gram matrices ``(rows, n, n)`` of ``n`` float64 ``(rows, cols)`` tensors."""
    count = len(rows)
    out = torch.zeros(rows[0].shape[0], count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            value = (rows[i] * rows[j]).sum(dim=1)
            out[:, i, j] = value
            out[:, j, i] = value
    return out


class TopK:
    """Membership in the ``k`` largest of a stream of non-negative float32 values (``|delta|``).

    Order: larger value first; equal values by lower flat index first, so ``TopK(a)`` is a subset of
    ``TopK(b)`` for ``a < b``. The threshold comes from an exact radix select over the float bits
    (two histogram passes); ``mask`` must then be called on consecutive chunks in index order.
    """

    def __init__(self, chunks: Callable[[], Iterator[torch.Tensor]], k: int, numel: int) -> None:
        self.k = k
        self.numel = numel
        self.seen_ties = 0
        self.threshold = 0
        self.ties_needed = 0
        if 0 < k < numel:
            self._select(chunks)

    def _select(self, chunks: Callable[[], Iterator[torch.Tensor]]) -> None:
        high_counts = torch.zeros(1 << 15, dtype=torch.int64)
        for magnitude in chunks():
            top_bits = magnitude.view(torch.int32).bitwise_right_shift(16)
            high_counts += torch.bincount(top_bits, minlength=1 << 15)
        high, above = _from_top(high_counts, self.k)
        low_counts = torch.zeros(1 << 16, dtype=torch.int64)
        for magnitude in chunks():
            bits = magnitude.view(torch.int32)
            chosen = bits[bits.bitwise_right_shift(16) == high].bitwise_and(0xFFFF)
            low_counts += torch.bincount(chosen, minlength=1 << 16)
        low, above_low = _from_top(low_counts, self.k - above)
        self.threshold = (high << 16) | low
        self.ties_needed = self.k - above - above_low

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        """Float 1/0 mask of the next chunk's elements that are among the top ``k``."""
        if self.k <= 0:
            return torch.zeros_like(magnitude)
        if self.k >= self.numel:
            return torch.ones_like(magnitude)
        bits = magnitude.view(torch.int32)
        ties = bits == self.threshold
        count = int(ties.sum())
        if self.seen_ties + count <= self.ties_needed:  # every tie here is kept
            keep = bits >= self.threshold
        else:
            keep = bits > self.threshold
            if self.seen_ties < self.ties_needed:  # the chunk where the kept ties run out
                rank = ties.to(torch.int64).cumsum(0).add_(self.seen_ties)
                keep |= ties & (rank <= self.ties_needed)
        self.seen_ties += count
        return keep.to(torch.float32)


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the ``k``-th largest element, and how many elements lie in higher bins."""
    from_top = counts.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([k], dtype=torch.int64))[0])
    index = counts.numel() - 1 - position
    return index, int(from_top[position]) - int(counts[index])


def mix(
    weighted: list[torch.Tensor], weights: Sequence[float], sign_election: bool, normalize: bool
) -> torch.Tensor:
    """Combine weighted deltas as mergekit's generalized task arithmetic does.

    Without sign election: the sum, divided by ``sum(weights)`` when ``normalize`` (unless it is below
    1e-8 in magnitude). With it (TIES "sum" consensus, ``elect``): the majority sign is the sign of the
    sum (0 counts as +), only deltas of that sign (zeros excluded) are summed, and ``normalize`` divides
    by the weights of the agreeing deltas (1 where none agrees).
    """
    if sign_election:
        return elect(weighted, weights, normalize)
    mixed = torch.stack(weighted).sum(0)
    total = math.fsum(weights)
    return mixed.div_(total) if normalize and abs(total) >= 1e-8 else mixed


def elect(weighted: list[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """TIES sign election of float32 ``weighted`` deltas (consumed: modified in place).

    Float passes only, no boolean masks: with ``sign`` the elected sign (+-1), ``threshold(sign * w)``
    is ``|w|`` where ``w`` agrees and +0 elsewhere; their sum in index order, times ``sign``, is the
    agreeing sum (where none agrees the sum is +0 and the elected sign is +). The sum deciding the sign
    adds in index order up to ``SEQUENTIAL_SUM`` deltas (as ``torch.stack(...).sum(0)`` does), beyond
    that it is that sum itself.
    """
    if len(weighted) > SEQUENTIAL_SUM:
        total = torch.stack(weighted).sum(0)
    else:
        total = torch.add(weighted[0], weighted[1]) if len(weighted) > 1 else weighted[0].clone()
        for tensor in weighted[2:]:
            total.add_(tensor)
    sign = torch.copysign(torch.ones(()), total.add_(0.0))  # -0 + 0 = +0: a zero sum elects +
    agreed = [F.threshold(tensor.mul_(sign), 0.0, 0.0, inplace=True) for tensor in weighted]
    mixed = torch.add(agreed[0], agreed[1]) if len(agreed) > 1 else agreed[0].clone()
    for tensor in agreed[2:]:
        mixed.add_(tensor)
    if not normalize:
        return mixed.mul_(sign)
    divisor = agreed[0].sign_().mul_(weights[0])  # agreement 1/0 times the weight
    for tensor, weight in zip(agreed[1:], weights[1:], strict=True):
        divisor.add_(tensor.sign_(), alpha=weight)
    if all(float(numpy.float32(weight)) >= NORMAL for weight in weights):
        divisor.clamp_(min=NORMAL)  # 0 only where nothing agrees (mixed +0): +0 / NORMAL = +0 / 1
    else:
        divisor.add_(1.0 - divisor.abs().sign())
    return mixed.div_(divisor).mul_(sign)


class Sparsifier:
    """Per-variant sparsification applied chunk by chunk (``apply`` in index order)."""

    def apply(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        return delta


class Bernoulli(Sparsifier):
    """DARE: keep each element with probability ``density`` (keyed draws), rescale survivors by 1/density."""

    def __init__(self, density: float, rescale: bool, seed: int, name: str, index: int) -> None:
        self.density = density
        self.rescale = rescale
        self.key = stream_key(seed, name, index)

    def apply(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        if self.density >= 1.0:
            return delta
        draws = uniform_int16(self.key, start, start + delta.numel()).to(torch.float32)
        # keep iff u < density with u = (draw + 32768.5) / 65536
        keep = draws.neg_().add_(LEVELS * self.density - INT16_OFFSET - 0.5).sign_().clamp_(min=0.0)
        kept = delta.mul_(keep)
        return kept.div_(self.density) if self.rescale else kept


class Magnitude(Sparsifier):
    """TIES trim / breadcrumbs: keep the ``top`` largest ``|delta|`` minus the ``skip`` largest."""

    def __init__(
        self, chunks: Callable[[], Iterator[torch.Tensor]], numel: int, top: int, skip: int = 0
    ) -> None:
        self.keep = TopK(chunks, top, numel)
        self.drop = TopK(chunks, skip, numel) if skip > 0 else None

    def apply(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        magnitude = delta.abs()
        mask = self.keep.mask(magnitude)
        if self.drop is not None:
            mask.sub_(self.drop.mask(magnitude))
        return delta.mul_(mask)


def abs_delta(flat_base: torch.Tensor, flat_variant: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``|variant - base|`` over ``[start, stop)`` in float32."""
    return f32(flat_variant, start, stop).sub_(flat_base[start:stop].float()).abs_()


def delta_chunks(
    flat_base: torch.Tensor, flat_variant: torch.Tensor, chunk_elems: int
) -> Callable[[], Iterator[torch.Tensor]]:
    """A re-iterable source of ``|variant - base|`` float32 chunks."""

    def iterate() -> Iterator[torch.Tensor]:
        for start, stop in spans(flat_base.numel(), chunk_elems):
            yield abs_delta(flat_base, flat_variant, start, stop)

    return iterate


def task_arithmetic_family(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    weights: Sequence[float],
    sparsifiers: Sequence[Sparsifier | None],
    *,
    sign_election: bool,
    normalize: bool,
    scale: float,
    chunk_elems: int,
) -> torch.Tensor:
    """``base + scale * mix(w_i * sparsify_i(v_i - base))`` chunk by chunk, output in the base dtype."""
    flat_base, flats = flatten(base, variants)
    out = torch.empty_like(flat_base)
    for start, stop in spans(flat_base.numel(), chunk_elems):
        base32 = f32(flat_base, start, stop)
        weighted = []
        for flat, weight, sparsifier in zip(flats, weights, sparsifiers, strict=True):
            delta = f32(flat, start, stop).sub_(base32)
            if sparsifier is not None:
                delta = sparsifier.apply(delta, start)
            weighted.append(delta.mul_(weight))
        mixed = mix(weighted, weights, sign_election, normalize)
        out[start:stop] = base32.add_(mixed, alpha=scale)
    return out.reshape(base.shape)


def check_shapes(base: torch.Tensor, variants: Sequence[torch.Tensor], name: str) -> None:
    """One-line InputError unless there are variants and each has the base's shape."""
    if not variants:
        raise InputError(f"tensor {name!r}: no variants to merge")
    for index, variant in enumerate(variants):
        if variant.shape != base.shape:
            raise InputError(
                f"tensor {name!r}: variant {index + 1} has shape {tuple(variant.shape)}, "
                f"base has {tuple(base.shape)}"
            )
