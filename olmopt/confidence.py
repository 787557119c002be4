"""Confidence intervals for scores measured on a finite number of items, and ties by confidence.

An accuracy-like score (the share of items right: ``accuracy``, ``token_accuracy``, ``mc_accuracy``) of
``n`` items has a Wilson score interval; the difference of two such scores has Newcombe's hybrid score
interval (Newcombe 1998, method 10). A difference whose interval contains 0 is not significant: the two
candidates tie. Pure maths: no torch, no Optuna. See docs/selection.md ("Ties by confidence").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist

from olmopt.errors import InputError

# metrics whose per-item values are 0 or 1, so that a score is a binomial share of its items
PROPORTION_METRICS = frozenset({"accuracy", "token_accuracy", "mc_accuracy"})


def z_value(level: float) -> float:
    """The two-sided normal quantile of a confidence ``level`` (0.95 -> 1.95996...)."""
    if not 0.0 < level < 1.0:
        raise InputError(f"confidence level {level!r} must lie strictly between 0 and 1")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson(share: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``share`` observed on ``n`` items."""
    if n <= 0:
        raise ValueError("wilson: n must be positive")
    z = z_value(level)
    denom = 1 + z * z / n
    centre = (share + z * z / (2 * n)) / denom
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def difference_interval(p1: float, n1: int, p2: float, n2: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's interval of ``p1 - p2`` for independent proportions from their Wilson intervals."""
    l1, u1 = wilson(p1, n1, level)
    l2, u2 = wilson(p2, n2, level)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def is_share(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 1.0


@dataclass(frozen=True)
class ConfidenceTies:
    """Which differences selection treats as ties: ``tied(objective, a, b)``.

    ``counts`` maps each accuracy-like objective to its number of items: two of its scores tie when
    their difference's interval at ``level`` contains 0. Other objectives (losses, generation scores)
    have no interval without per-item scores: their values tie only when equal. Non-finite values tie
    only with each other (both are the worst).
    """

    counts: Mapping[str, int]
    level: float = 0.95

    def tied(self, objective: str, a: float, b: float) -> bool:
        if a == b or (not math.isfinite(a) and not math.isfinite(b)):
            return True
        n = self.counts.get(objective, 0)
        if n <= 0 or not is_share(a) or not is_share(b):
            return False
        low, high = difference_interval(a, n, b, n, self.level)
        return low <= 0.0 <= high

    def describe(self) -> str:
        shares = ", ".join(f"{o} ({n} items)" for o, n in sorted(self.counts.items()))
        return f"ties by {self.level:.0%} confidence on {shares or 'no objective'}; other objectives by value"


def proportion_counts(metric_of: Mapping[str, str], items: Mapping[str, int]) -> dict[str, int]:
    """Item counts of the accuracy-like objectives among ``items`` (objective -> number of items)."""
    return {o: n for o, n in items.items() if metric_of.get(o) in PROPORTION_METRICS and n > 0}


def selection_ties(
    tolerance: float | None, level: float, metric_of: Mapping[str, str], items: Mapping[str, int]
) -> tuple[float, ConfidenceTies | None]:
    """(fixed tolerance, confidence rule) of a stage's selection: an explicit ``tolerance`` alone, else
    ties by confidence on the accuracy-like objectives of ``items`` (objective -> search items)."""
    if tolerance is not None:
        return tolerance, None
    return 0.0, ConfidenceTies(proportion_counts(metric_of, items), level)
