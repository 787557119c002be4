"""Confidence intervals for scores measured on a finite number of items, and ties by confidence.

An accuracy-like score (the share of items right: ``accuracy``, ``token_accuracy``, ``mc_accuracy``) of
``n`` items has a Wilson score interval; the difference of two such scores has Newcombe's hybrid score
interval (Newcombe 1998, method 10); a loss-like score with per-item values has a paired bootstrap
interval (``olmopt.bootstrap``). A difference whose interval contains 0 is not significant: the two
candidates tie. Pure maths: no torch, no Optuna. See docs/selection.md ("Ties by confidence").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

from olmopt.bootstrap import RESAMPLES, PairedBootstrap
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


ItemValues = Mapping[str, Mapping[str, Mapping[int, float]]]  # objective -> candidate -> item -> value


@dataclass(frozen=True)
class Comparison:
    """How ``a`` compares with ``b`` on one objective: the ``rule`` used (``newcombe``, ``bootstrap`` or
    ``equal``), the interval of ``a - b`` (None without one) and whether the difference is a tie."""

    rule: str
    interval: tuple[float, float] | None
    tied: bool


@dataclass(frozen=True)
class ConfidenceTies:
    """Which differences selection treats as ties: ``tied(objective, a, b, x, y)`` (values ``a``, ``b`` of
    candidates ``x``, ``y``).

    ``counts`` maps each accuracy-like objective to its number of items: two of its scores tie when
    their difference's Newcombe interval at ``level`` contains 0. ``items`` holds the per-item values
    of the other objectives (losses, generation scores; ``tokens``: the answer tokens of each item of a
    perplexity objective): two candidates with values on common items tie when the paired bootstrap
    interval of their difference (``bootstrap.PairedBootstrap``) contains 0. Otherwise values tie only
    when equal. Non-finite values tie only with each other (both are the worst).
    """

    counts: Mapping[str, int]
    level: float = 0.95
    items: ItemValues = field(default_factory=dict)
    tokens: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    resamples: int = RESAMPLES
    _boots: dict[tuple[str, tuple[int, ...]], PairedBootstrap | None] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    _pairs: dict[tuple[str, str, str], tuple[float, float] | None] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def tied(self, objective: str, a: float, b: float, x: str = "", y: str = "") -> bool:
        return self.compare(objective, a, b, x, y).tied

    def compare(self, objective: str, a: float, b: float, x: str = "", y: str = "") -> Comparison:
        """Candidate ``x`` (value ``a``) against ``y`` (value ``b``) on ``objective``."""
        if not math.isfinite(a) or not math.isfinite(b):
            return Comparison("equal", None, not math.isfinite(a) and not math.isfinite(b))
        n = self.counts.get(objective, 0)
        if n > 0 and is_share(a) and is_share(b):
            low, high = difference_interval(a, n, b, n, self.level)
            return Comparison("newcombe", (low, high), low <= 0.0 <= high)
        key = (objective, x, y)
        if key not in self._pairs:
            self._pairs[key] = self._bootstrap(objective, x, y)
        interval = self._pairs[key]
        if interval is not None:
            return Comparison("bootstrap", interval, a == b or interval[0] <= 0.0 <= interval[1])
        return Comparison("equal", None, a == b)

    def _bootstrap(self, objective: str, x: str, y: str) -> tuple[float, float] | None:
        """The paired bootstrap interval of ``x - y`` on their common items; None without per-item values."""
        per = self.items.get(objective, {})
        if x not in per or y not in per:
            return None
        vx, vy = per[x], per[y]
        common = tuple(sorted(set(vx) & set(vy)))
        key = (objective, common)
        if key not in self._boots:
            self._boots[key] = self._resampler(objective, common)
        boot = self._boots[key]
        if boot is None or not all(math.isfinite(vx[i]) and math.isfinite(vy[i]) for i in common):
            return None
        return boot.interval(vx, vy, self.level, (x, y))

    def _resampler(self, objective: str, common: tuple[int, ...]) -> PairedBootstrap | None:
        tokens = self.tokens.get(objective)
        if not common or (tokens is not None and any(i not in tokens for i in common)):
            return None
        return PairedBootstrap(objective, common, tokens, self.resamples)

    def describe(self) -> str:
        parts = []
        if self.counts:
            parts.append(
                "Newcombe on " + ", ".join(f"{o} ({n} items)" for o, n in sorted(self.counts.items()))
            )
        if self.items:
            parts.append(f"paired bootstrap ({self.resamples} resamples) on {', '.join(sorted(self.items))}")
        return f"ties by {self.level:.0%} confidence: {', '.join(parts) or 'no objective'}; others by value"


def mean_with_interval(
    values: dict[str, float], directions: dict[str, str], counts: dict[str, int] | None
) -> list[float] | None:
    """[mean over objectives, half-width of its 95 % interval] for maximised scores in [0, 1] (each
    objective a binomial share of its ``counts`` items, objectives independent); None otherwise."""
    if (
        not values
        or any(d != "maximize" for d in directions.values())
        or any(not 0 <= v <= 1 for v in values.values())
    ):
        return None
    k = len(values)
    mean = sum(values.values()) / k
    if not counts or any(counts.get(o, 0) <= 0 for o in values):
        return [mean, float("nan")]
    var = sum(p * (1 - p) / counts[o] for o, p in values.items()) / k**2
    return [mean, 1.96 * var**0.5]


def proportion_counts(metric_of: Mapping[str, str], items: Mapping[str, int]) -> dict[str, int]:
    """Item counts of the accuracy-like objectives among ``items`` (objective -> number of items)."""
    return {o: n for o, n in items.items() if metric_of.get(o) in PROPORTION_METRICS and n > 0}


def selection_ties(
    tolerance: float | None,
    level: float,
    metric_of: Mapping[str, str],
    items: Mapping[str, int],
    per_item: ItemValues | None = None,
    tokens: Mapping[str, Mapping[int, int]] | None = None,
) -> tuple[float, ConfidenceTies | None]:
    """(fixed tolerance, confidence rule) of a stage's selection: an explicit ``tolerance`` alone, else
    ties by confidence: Newcombe on the accuracy-like objectives of ``items`` (objective -> search items),
    the paired bootstrap on the other objectives of ``per_item`` (objective -> candidate -> item -> value;
    perplexity objectives only with their ``tokens``)."""
    if tolerance is not None:
        return tolerance, None
    counts = proportion_counts(metric_of, items)
    tokens = tokens or {}
    boot = {
        o: per
        for o, per in (per_item or {}).items()
        if o not in counts and per and (metric_of.get(o) != "perplexity" or o in tokens)
    }
    return 0.0, ConfidenceTies(counts, level, boot, {o: tokens[o] for o in boot if o in tokens})


def significance_table(
    verdicts: Mapping[str, Mapping[str, str]],
    scores: Mapping[str, Mapping[str, float]],
    winner: str,
    rule: ConfidenceTies | None,
    tolerance: float,
    labels: Iterable[str],
) -> dict[str, dict[str, dict[str, Any]]]:
    """candidate -> objective -> {verdict, rule, interval} for the candidates ``labels`` (the runner-up
    and the incumbent): their ``verdicts`` (``select.significance``) with the rule that decided each and
    the interval of (candidate - winner), None without one."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for label in labels:
        row = verdicts.get(label)
        if row is None:
            continue
        out: dict[str, dict[str, Any]] = {}
        for objective, verdict in row.items():
            a, w = scores[objective].get(label, math.nan), scores[objective].get(winner, math.nan)
            if rule is None:
                cmp = Comparison(f"tolerance {tolerance:g}", None, verdict == "tie")
            else:
                cmp = rule.compare(objective, a, w, label, winner)
            interval = None if cmp.interval is None else [cmp.interval[0], cmp.interval[1]]
            out[objective] = {"verdict": verdict, "rule": cmp.rule, "interval": interval}
        table[label] = out
    return table
