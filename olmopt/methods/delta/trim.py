"""TIES trim: the exact top ``k`` of ``|variant - base|`` (equal values: lower flat index first), fast.

The kept set is a ``Cut``: ``|d| > threshold``, plus ``|d| == threshold`` at flat indices below
``split``; ``Cut.apply`` keeps those deltas with one ``hardshrink`` per chunk (no masks, no state,
any chunk order). The cut is found around the ``k / numel`` quantile of a sample (fixed pseudo-random
positions, so that periodic structure cannot bias it):

- when the sample's value there is tied well beyond the sampling error (bf16 deltas usually are),
  one pass counts ``|d| > t`` and ``|d| >= t`` per chunk and confirms it;
- otherwise one pass counts the elements above a bracket of sample quantiles and gathers those inside
  it (a few percent), where ``numpy.partition`` finds the threshold.

Counts are float sums of 0/1 (exact: one sum covers at most ``COUNT_BLOCK`` elements). Whenever the
sample misled (the threshold outside the bracket, non-finite values), ``select_cut`` returns None and
the caller uses the radix select of ``_kernels.TopK``: the result is the same, only slower.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from olmopt.methods.delta._kernels import Magnitude, Sparsifier, abs_delta, delta_chunks, spans

SAMPLE = 1 << 14  # sample size; tensors below 2 * SAMPLE elements are ranked whole
SIGMAS = 4.5  # bracket half-width, in standard deviations of the sample quantile's rank
COUNT_BLOCK = 1 << 24  # float32 sums of 0/1 are exact below 2**24


def trim(flat_base: torch.Tensor, flat_variant: torch.Tensor, k: int, chunk_elems: int) -> Sparsifier:
    """TIES sparsifier keeping the ``k`` largest ``|variant - base|``: a ``Cut``, else the radix select."""
    numel = flat_base.numel()
    cut = select_cut(flat_base, flat_variant, k, chunk_elems) if 0 < k < numel else None
    return cut or Magnitude(delta_chunks(flat_base, flat_variant, chunk_elems), numel, k)


@dataclass(frozen=True)
class Cut(Sparsifier):
    """Keep ``|d| > threshold``, and ``|d| == threshold`` at flat indices below ``split``."""

    threshold: float  # a float32 value, >= 0
    split: int

    def apply(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """The kept part of ``delta`` (float32 chunk at flat offset ``start``); others become +0."""
        inclusive = below(self.threshold)  # |d| > below(t) <=> |d| >= t
        cut = self.split - start
        if cut <= 0:
            return F.hardshrink(delta, self.threshold)
        if cut >= delta.numel():
            return F.hardshrink(delta, inclusive)
        out = torch.empty_like(delta)
        torch.hardshrink(delta[:cut], inclusive, out=out[:cut])
        torch.hardshrink(delta[cut:], self.threshold, out=out[cut:])
        return out


def below(value: float) -> float:
    """The float32 just below ``value`` (negative for 0: then every ``|d|`` is above it)."""
    return float(np.nextafter(np.float32(value), np.float32(-np.inf)))


def magnitudes(
    flat_base: torch.Tensor, flat_variant: torch.Tensor, chunk_elems: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, |variant - base|)`` float32 chunks in index order."""
    for start, stop in spans(flat_base.numel(), chunk_elems):
        yield start, abs_delta(flat_base, flat_variant, start, stop)


def count_above(magnitude: torch.Tensor, value: float) -> int:
    """How many of the non-negative ``magnitude`` values exceed ``value`` (-1 when there is a NaN)."""
    total = 0
    for block in magnitude.split(COUNT_BLOCK):
        ones = F.hardshrink(block, value).sign_().sum()
        if not math.isfinite(float(ones)):
            return -1
        total += int(ones)
    return total


def select_cut(flat_base: torch.Tensor, flat_variant: torch.Tensor, k: int, chunk_elems: int) -> Cut | None:
    """The cut keeping the ``k`` largest ``|variant - base|`` (``0 < k < numel``); None: use the radix."""
    numel = flat_base.numel()
    if numel < 2 * SAMPLE:
        whole = (flat_variant.float() - flat_base.float()).abs_().numpy()
        return _exact(whole, k) if np.isfinite(whole).all() else None
    picks = torch.randint(numel, (SAMPLE,), generator=torch.Generator().manual_seed(numel))
    sample = (flat_variant[picks].float() - flat_base[picks].float()).abs_().numpy()
    if not np.isfinite(sample).all():
        return None
    count = sample.size
    rank = min(count - 1, max(0, math.ceil(k * count / numel) - 1))  # estimate, from the top
    margin = math.ceil(SIGMAS * math.sqrt(count * (k / numel) * (1 - k / numel))) + 1
    top, bottom = max(0, rank - margin), min(count - 1, rank + margin)  # ranks from the top
    ordered = np.partition(sample, sorted({count - 1 - top, count - 1 - rank, count - 1 - bottom}))
    high, guess, low = (float(ordered[count - 1 - r]) for r in (top, rank, bottom))
    if float((sample > guess).sum()) < rank - margin and float((sample >= guess).sum()) > rank + margin:
        cut = _confirm(flat_base, flat_variant, k, guess, chunk_elems)
        if cut is not None:
            return cut
    return _bracket(flat_base, flat_variant, k, low, high, chunk_elems)


def _exact(magnitude: np.ndarray, k: int) -> Cut:
    """Small tensors: rank every magnitude."""
    numel = magnitude.size
    threshold = float(np.partition(magnitude, numel - k)[numel - k])
    above = int((magnitude > threshold).sum())
    ties = np.flatnonzero(magnitude == threshold)
    return _cut(threshold, k - above, ties, numel)


def _cut(threshold: float, needed: int, ties: np.ndarray, numel: int) -> Cut:
    """The cut once the tied positions (ascending) of the threshold are known."""
    split = numel if needed >= ties.size else int(ties[needed - 1]) + 1
    return Cut(threshold, split)


def _confirm(
    flat_base: torch.Tensor, flat_variant: torch.Tensor, k: int, guess: float, chunk_elems: int
) -> Cut | None:
    """One counting pass: the cut at ``guess`` when the ``k``-th largest is ``guess``, else None."""
    above, at_least, per_chunk = 0, 0, []
    for start, magnitude in magnitudes(flat_base, flat_variant, chunk_elems):
        over = count_above(magnitude, guess)
        from_guess = magnitude.numel() if guess == 0 else count_above(magnitude, below(guess))
        if over < 0 or from_guess < 0:
            return None
        above += over
        at_least += from_guess
        per_chunk.append((start, from_guess - over))
    if not above < k <= at_least:
        return None
    needed = k - above
    if needed == at_least - above:
        return Cut(guess, flat_base.numel())
    seen = 0
    for start, ties in per_chunk:
        if seen + ties >= needed:
            stop = min(flat_base.numel(), start + max(1, int(chunk_elems)))
            positions = torch.nonzero(abs_delta(flat_base, flat_variant, start, stop) == guess).view(-1)
            return Cut(guess, start + int(positions[needed - seen - 1]) + 1)
        seen += ties
    return None


def _bracket(
    flat_base: torch.Tensor, flat_variant: torch.Tensor, k: int, low: float, high: float, chunk_elems: int
) -> Cut | None:
    """One pass: count above ``high``, gather ``[low, high]`` (with positions) and rank inside it."""
    if low <= 0.0:
        return None  # zeros cannot be gathered by value; rare enough for the radix
    floor = below(low)
    above, values, places = 0, [], []
    for start, magnitude in magnitudes(flat_base, flat_variant, chunk_elems):
        inside = F.hardshrink(magnitude, floor)  # >= low
        over = F.hardshrink(inside, high)  # > high
        count = count_above(over, 0.0)
        if count < 0:
            return None
        above += count
        inside.sub_(over)  # in [low, high]: the value, elsewhere 0
        found = torch.nonzero(inside).view(-1)
        values.append(inside[found].numpy())
        places.append(found.numpy() + start)
    pool = np.concatenate(values)
    wanted = k - above  # rank inside the bracket, from the top
    if not 0 < wanted <= pool.size:
        return None
    threshold = float(np.partition(pool, pool.size - wanted)[pool.size - wanted])
    over_threshold = int((pool > threshold).sum())
    ties = np.concatenate(places)[pool == threshold]
    return _cut(threshold, k - above - over_threshold, ties, flat_base.numel())
