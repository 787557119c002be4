"""Paired bootstrap intervals for differences of scores measured on the same items.

Two candidates scored on the same items differ, per resample, by ``stat(a) - stat(b)`` where each
resample draws the items with replacement (multinomial counts ``W``, one row per resample) and ``stat``
is the objective's value over the drawn items: their mean, or for perplexity ``exp(sum CE / sum
tokens)`` (per item: summed token cross-entropy and answer tokens). The interval is the percentile
interval of those differences. The resamples of an objective are seeded from its name and its item
indices, and shared by every pair of candidates scored on those items: the same decision whoever
computes it, and one matrix product per candidate. Pure numpy; see docs/selection.md.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 2000
MAX_LOG = 709.0  # exp overflows beyond: perplexity is inf (as ``metrics.perplexity_from_sums``)


def bootstrap_seed(objective: str, items: Sequence[int]) -> int:
    """A 64-bit seed from an objective's name and the indices of the items resampled."""
    digest = hashlib.sha256(f"{objective}|{','.join(map(str, items))}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, n)`` multinomial counts: how often each of ``n`` items is drawn in each resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of ``samples`` (numpy's linear quantiles)."""
    low, high = np.quantile(samples, [(1.0 - level) / 2, (1.0 + level) / 2])
    return float(low), float(high)


class PairedBootstrap:
    """The resamples of one objective on one set of items; ``interval(a, b)`` of ``stat(a) - stat(b)``.

    ``tokens`` (item -> answer tokens) makes the statistic perplexity; without it, the mean. A
    candidate's per-resample statistic is computed once (``statistic``) and reused for every pair.
    """

    def __init__(
        self,
        objective: str,
        items: Sequence[int],
        tokens: Mapping[int, int] | None = None,
        resamples: int = RESAMPLES,
    ) -> None:
        if not items:
            raise ValueError("PairedBootstrap: no items")
        self.items = tuple(items)
        self.counts = resample_counts(len(self.items), resamples, bootstrap_seed(objective, self.items))
        self.token_sums = (
            None
            if tokens is None
            else self.counts @ np.array([tokens[i] for i in self.items], dtype=np.float64)
        )
        self._stats: dict[str, np.ndarray] = {}

    def statistic(self, values: Mapping[int, float], key: str | None = None) -> np.ndarray:
        """The objective's value over each resample of ``values`` (item -> value); cached under ``key``."""
        if key is not None and key in self._stats:
            return self._stats[key]
        sums = self.counts @ np.array([values[i] for i in self.items], dtype=np.float64)
        if self.token_sums is None:
            stat = sums / len(self.items)
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                mean = sums / self.token_sums
            stat = np.where(mean > MAX_LOG, math.inf, np.exp(np.minimum(mean, MAX_LOG)))
        if key is not None:
            self._stats[key] = stat
        return stat

    def interval(
        self,
        a: Mapping[int, float],
        b: Mapping[int, float],
        level: float = 0.95,
        keys: tuple[str, str] | None = None,
    ) -> tuple[float, float] | None:
        """Percentile interval of ``stat(a) - stat(b)``; None when a resample is not finite."""
        key_a, key_b = keys if keys is not None else (None, None)
        diff = self.statistic(a, key_a) - self.statistic(b, key_b)
        if not np.isfinite(diff).all():
            return None
        return percentile_interval(diff, level)


def unpaired_interval(
    objective: str,
    a: Mapping[int, float],
    b: Mapping[int, float],
    level: float = 0.95,
    tokens: tuple[Mapping[int, int], Mapping[int, int]] | None = None,
    resamples: int = RESAMPLES,
) -> tuple[float, float] | None:
    """Percentile interval of ``stat(a) - stat(b)`` for scores on two different item sets (the search and
    the sealed test part): each set resampled on its own, with its own seed. ``tokens``: the two sets'
    answer tokens (perplexity). None when a set is empty or a resample is not finite."""
    if not a or not b:
        return None
    stats = []
    for values, side in ((a, 0), (b, 1)):
        boot = PairedBootstrap(
            f"{objective}|{side}", sorted(values), tokens[side] if tokens else None, resamples
        )
        stats.append(boot.statistic(values))
    diff = stats[0] - stats[1]
    if not np.isfinite(diff).all():
        return None
    return percentile_interval(diff, level)
