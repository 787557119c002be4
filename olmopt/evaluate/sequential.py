"""Paired sequential early stopping: can a candidate, seen on the first items, still win its stage?

Pure and torch-free. A stage evaluates every candidate on the same items in the same fixed random order,
in chunks; after each chunk but the last the runner *looks*: it compares the candidate's per-item scores
with the incumbent's on the items both have seen (paired differences ``d_i = candidate - incumbent``,
oriented so that positive means the candidate is better).

**The rule.** At look ``k`` (``n_k`` items seen of a planned ``n_last`` at the last look before the end)
each test is run at the level ``alpha_k = alpha * (n_k - n_{k-1}) / n_last`` (linear alpha spending,
Bonferroni over looks: the chance of ever stopping wrongly is at most the sum, ``alpha``, whatever the
correlation between looks). The candidate is stopped when

* ``score: copeland`` (Pareto + Copeland): on EVERY objective the one-sided test rejects "the candidate
  is no worse than the incumbent by more than the tolerance" at ``alpha_k``. An intersection-union test:
  no correction over objectives is needed. A candidate dominated by the (feasible) incumbent is not on
  the stage's feasible Pareto front, and the Copeland winner always is, so it cannot win.
* ``score: mean``: the mean over objectives of the per-objective upper confidence bounds (each at
  ``alpha_k / K``, Bonferroni over the ``K`` objectives) is below 0: its objective mean is worse.

Tests: 0/1 scores (accuracies) use the exact sign test on the discordant items (McNemar, binomial
tail); other scores a one-sided Student t test (bounds: t intervals). The population is the stage's
fixed item set and the first ``n`` items of a random order are a sample without replacement from it, for
which both tests are conservative (no finite-population correction). An objective whose per-item mean
is not its value (perplexity: the per-item score is the item's summed cross-entropy, which orders the
candidates the same way only without a tolerance) has ``shift=None`` when it cannot be certified: the
candidate is then never stopped by this rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats

Score = Literal["copeland", "mean"]


@dataclass(frozen=True)
class Look:
    """One comparison's inputs for an objective: oriented paired differences and the allowed shift.

    ``diffs``: candidate minus incumbent per item, positive = candidate better. ``shift``: the
    tolerance in item units (a candidate within it of the incumbent is a tie, not dominated), or None
    when this objective can never certify that the candidate is worse. ``known``: the difference itself,
    when it is known without sampling (an objective read off the Recipe); ``diffs`` is then unused.
    """

    diffs: Sequence[float]
    shift: float | None = 0.0
    known: float | None = None

    def p_value(self) -> float:
        """One-sided p-value of "the candidate is no worse by more than the shift" (1: cannot certify)."""
        if self.shift is None:
            return 1.0
        if self.known is not None:
            return 0.0 if self.known + self.shift < 0 else 1.0
        return worse_p_value(self.diffs, self.shift)

    def bound(self, level: float) -> float:
        """One-sided ``1 - level`` upper confidence bound of the mean difference (+inf: cannot certify)."""
        if self.shift is None:
            return math.inf
        return self.known if self.known is not None else upper_bound(self.diffs, level)


@dataclass(frozen=True)
class Verdict:
    """The outcome of one look: stop or not, the level spent at this look, and why."""

    stop: bool
    level: float
    reason: str


def look_level(alpha: float, seen: int, previous: int, last_look: int) -> float:
    """Level spent at a look that has seen ``seen`` items after one at ``previous`` (linear spending)."""
    if last_look <= 0 or seen <= previous:
        return 0.0
    return alpha * (min(seen, last_look) - previous) / last_look


def is_binary(values: Sequence[float]) -> bool:
    """Whether every paired difference comes from 0/1 scores (differences in {-1, 0, 1})."""
    return all(v in (-1.0, 0.0, 1.0) for v in values)


def worse_p_value(diffs: Sequence[float], shift: float = 0.0) -> float:
    """One-sided p-value of H0 "mean(d) >= -shift" against "the candidate is worse by more than shift".

    0/1 scores without a shift: the exact sign test on the discordant items, ``P(Bin(m, 1/2) <= wins)``.
    Otherwise Student t on ``d + shift``; zero spread gives 0 for a negative mean, 1 otherwise.
    """
    n = len(diffs)
    if n == 0:
        return 1.0
    if shift == 0.0 and is_binary(diffs):
        wins = sum(1 for d in diffs if d > 0)
        losses = sum(1 for d in diffs if d < 0)
        return float(stats.binom.cdf(wins, wins + losses, 0.5)) if wins + losses else 1.0
    shifted = [d + shift for d in diffs]
    mean = sum(shifted) / n
    if n < 2:
        return 1.0
    var = sum((x - mean) ** 2 for x in shifted) / (n - 1)
    if var <= 0.0:
        return 0.0 if mean < 0 else 1.0
    return float(stats.t.cdf(mean / math.sqrt(var / n), n - 1))


def upper_bound(diffs: Sequence[float], level: float) -> float:
    """One-sided ``1 - level`` upper confidence bound of mean(d) (Student t; +inf below 2 items)."""
    n = len(diffs)
    if n < 2 or level <= 0.0:
        return math.inf
    mean = sum(diffs) / n
    var = sum((x - mean) ** 2 for x in diffs) / (n - 1)
    return mean + float(stats.t.ppf(1.0 - level, n - 1)) * math.sqrt(var / n)


def decide(looks: Mapping[str, Look], level: float, score: Score = "copeland") -> Verdict:
    """Whether the candidate cannot win the stage's selection, at this look's ``level`` (module docstring)."""
    if not looks or level <= 0.0:
        return Verdict(False, level, "nothing to compare")
    names = sorted(looks)
    if any(looks[n].shift is None for n in names):
        return Verdict(False, level, "an objective cannot be certified")
    seen = min((len(looks[n].diffs) for n in names if looks[n].known is None), default=0)
    if score == "mean":
        each = level / len(names)
        bound = sum(looks[n].bound(each) for n in names) / len(names)
        if bound < 0.0:
            return Verdict(
                True,
                level,
                f"objective mean worse than the incumbent's after {seen} items "
                f"(upper bound {bound:.4g}, level {level:.3g})",
            )
        return Verdict(False, level, f"mean bound {bound:.4g}")
    p_values = {n: looks[n].p_value() for n in names}
    if all(p <= level for p in p_values.values()):
        worst = max(p_values.values())
        return Verdict(
            True,
            level,
            f"dominated by the incumbent after {seen} items (largest p {worst:.3g} <= level {level:.3g})",
        )
    return Verdict(False, level, "not dominated: " + ", ".join(f"{n} p {p_values[n]:.3g}" for n in names))
