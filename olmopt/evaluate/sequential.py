"""Paired sequential early stopping: can a candidate, seen on the first items, still win its stage?

Pure and torch-free. A stage evaluates every candidate on the same items in the same fixed random order,
in chunks; after each chunk but the last the runner *looks*: it compares the candidate's per-item scores
with a reference's on the items both have seen (paired differences ``d_i = candidate - reference``,
oriented so that positive means the candidate is better). The reference is any feasible candidate of the
stage evaluated on every item (the incumbent, or the stage's current leader): a candidate that cannot
beat it cannot win the stage.

**The rule.** Look ``k`` of ``L`` (equally spaced in items, the last one before the end of the
evaluation) runs each test at a nominal level from a group-sequential boundary
(:func:`nominal_levels`), so that the chance of ever stopping wrongly over all looks is at most
``alpha``: Lan-DeMets alpha spending with the Pocock-type function ``alpha ln(1 + (e - 1) t)`` (the
default: spends early, stops clearly worse candidates soon) or the O'Brien-Fleming-type one
``2 - 2 Phi(z_{1 - alpha/2} / sqrt t)`` (spends late), the boundaries computed exactly for the
Brownian motion that the tests' statistics approach (independent increments, numerical integration); or
``bonferroni``: ``alpha / L`` at every look, valid whatever the dependence between looks and
conservative. The candidate is stopped when

* ``score: copeland`` (Pareto + Copeland): on EVERY objective the one-sided test rejects "the candidate
  is no worse than the reference by more than the tolerance" at ``alpha_k``. An intersection-union test:
  no correction over objectives is needed. A candidate dominated by the (feasible) reference is not on
  the stage's feasible Pareto front, and the Copeland winner always is, so it cannot win.
* ``score: mean``: the upper confidence bound of the mean over objectives of the mean differences
  (:func:`mean_bound`: one bound on the combined estimate, its variance the sum of the objectives')
  is below 0: its objective mean is worse. (``early_stop.run_chunks`` with ``spare_front`` goes on
  with a candidate ahead of the reference on some objective, :func:`ahead_on`: it may lie on the Pareto
  front that a multi-objective sampler learns from; docs/early_stop.md.)

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
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import optimize, stats

Score = Literal["copeland", "mean"]
Boundary = Literal["pocock", "obrien-fleming", "bonferroni"]
BOUNDARIES: tuple[Boundary, ...] = ("pocock", "obrien-fleming", "bonferroni")
_GRID = 0.02  # step of the numerical integration of the boundaries (in units of the final sd)
_Z_MAX = 8.0  # a look that spends (almost) nothing: its boundary, nominal level ~6e-16


@dataclass(frozen=True)
class Look:
    """One comparison's inputs for an objective: oriented paired differences and the allowed shift.

    ``diffs``: candidate minus reference per item, positive = candidate better. ``shift``: the
    tolerance in item units (a candidate within it of the reference is a tie, not dominated), or None
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

    def mean(self) -> float | None:
        """The difference estimate: the known difference, else the mean of ``diffs`` (None: no items)."""
        if self.known is not None:
            return self.known
        return sum(self.diffs) / len(self.diffs) if self.diffs else None


@dataclass(frozen=True)
class Verdict:
    """The outcome of one look: stop or not, the level spent at this look, and why."""

    stop: bool
    level: float
    reason: str


def spent(alpha: float, t: float, boundary: Boundary) -> float:
    """Alpha spent by information fraction ``t`` in [0, 1] (Lan-DeMets spending functions)."""
    if t <= 0.0:
        return 0.0
    if boundary == "pocock":
        return alpha * math.log1p((math.e - 1.0) * t)
    if boundary == "obrien-fleming":
        return float(2.0 * stats.norm.sf(stats.norm.isf(alpha / 2.0) / math.sqrt(t)))
    return alpha * t


@lru_cache(maxsize=64)
def nominal_levels(alpha: float, looks: int, boundary: Boundary = "pocock") -> tuple[float, ...]:
    """One-sided nominal level of each of ``looks`` equally spaced looks, spending ``alpha`` in all.

    ``bonferroni``: ``alpha / looks`` each. Otherwise the group-sequential boundary ``c_k`` of a
    standardised statistic ``Z_k = W(t_k) / sqrt(t_k)`` (``W`` a Brownian motion, ``t_k = k / looks``)
    with ``P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c_k) = spent(t_k) - spent(t_{k-1})`` under the
    null, found look by look with the density of ``W`` on the continuation region integrated on a grid;
    the level is ``1 - Phi(c_k)``.
    """
    if looks <= 0:
        return ()
    if boundary == "bonferroni":
        return (alpha / looks,) * looks
    grid = np.arange(-_Z_MAX, _Z_MAX + 2.0, _GRID)  # values of W(t) (final sd 1)
    density: np.ndarray | None = None  # of W(t_{k-1}) on the grid, continuing paths only
    levels: list[float] = []
    previous_t = 0.0
    for k in range(1, looks + 1):
        t = k / looks
        target = spent(alpha, t, boundary) - spent(alpha, previous_t, boundary)
        step = math.sqrt(t - previous_t)

        def crossing(
            c: float, density: np.ndarray | None = density, t: float = t, step: float = step
        ) -> float:
            """P(no stop before look k, then Z_k >= c)."""
            if density is None:
                return float(stats.norm.sf(c))
            return float(np.sum(density * stats.norm.sf((c * math.sqrt(t) - grid) / step)) * _GRID)

        c = _Z_MAX
        if target > 0.0 and crossing(_Z_MAX) < target:
            c = float(optimize.brentq(lambda x, g=target: crossing(x) - g, -_Z_MAX, _Z_MAX, xtol=1e-9))
        levels.append(float(stats.norm.sf(c)))
        if density is None:
            new = stats.norm.pdf(grid / step) / step
        else:
            kernel = stats.norm.pdf((grid[:, None] - grid[None, :]) / step) / step
            new = kernel @ density * _GRID
        density = np.where(grid < c * math.sqrt(t), new, 0.0)
        previous_t = t
    return tuple(levels)


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


def mean_bound(looks: Mapping[str, Look], level: float) -> float:
    """One-sided ``1 - level`` upper confidence bound of the mean over objectives of the mean differences.

    The objectives' items are different samples, so the estimate ``(1/K) sum_k mean(d_k)`` has the
    standard error ``(1/K) sqrt(sum_k var(d_k) / n_k)``, each variance taken about 0, the null's mean (a
    score test: ``sum d^2 / (n - 1)``, larger than the sample variance when the candidate is worse, and
    better calibrated for the 0/1 differences of accuracies); Student t with the smallest ``n_k - 1``
    degrees of freedom (an objective read off the Recipe adds its known difference, no
    variance). +inf when some objective cannot certify or has fewer than 2 items."""
    centre, variance, df = 0.0, 0.0, math.inf
    for look in looks.values():
        if look.shift is None:
            return math.inf
        if look.known is not None:
            centre += look.known
            continue
        n = len(look.diffs)
        if n < 2:
            return math.inf
        centre += sum(look.diffs) / n
        variance += sum(x * x for x in look.diffs) / (n - 1) / n  # about 0, the null's mean: a score test
        df = min(df, n - 1)
    k = max(1, len(looks))
    if variance <= 0.0 or level <= 0.0:
        return centre / k if variance <= 0.0 else math.inf
    return (centre + float(stats.t.ppf(1.0 - level, df)) * math.sqrt(variance)) / k


def ahead_on(looks: Mapping[str, Look], level: float = 1.0) -> list[str]:
    """Objectives on which the candidate is, or may be, ahead of the reference: the mean of its oriented
    differences (or the known difference) above 0, or nothing to compare yet. ``level`` below 1 asks
    more of sampled differences: the one-sided test that the candidate is better (``better_p_value``)
    at that level, so that a lead of one or two items in a chunk is not one."""

    def leads(look: Look) -> bool:
        diff = look.mean()
        if diff is None:
            return True
        if diff <= 0.0:
            return False
        return level >= 1.0 or look.known is not None or better_p_value(look.diffs) <= level

    return [name for name in sorted(looks) if leads(looks[name])]


def better_p_value(diffs: Sequence[float]) -> float:
    """One-sided p-value of H0 "mean(d) <= 0" against "the candidate is better": ``worse_p_value`` of the
    negated differences (0/1 scores: ``P(Bin(m, 1/2) >= wins)`` over the ``m`` discordant items)."""
    return worse_p_value([-d for d in diffs])


def decide(
    looks: Mapping[str, Look], level: float, score: Score = "copeland", against: str = "the reference"
) -> Verdict:
    """Whether the candidate cannot win the stage's selection, at this look's ``level`` (module docstring).

    ``against``: the reference's name in the reason."""
    if not looks or level <= 0.0:
        return Verdict(False, level, "nothing to compare")
    names = sorted(looks)
    if any(looks[n].shift is None for n in names):
        return Verdict(False, level, "an objective cannot be certified")
    seen = min((len(looks[n].diffs) for n in names if looks[n].known is None), default=0)
    if score == "mean":
        bound = mean_bound(looks, level)
        if bound < 0.0:
            return Verdict(
                True,
                level,
                f"objective mean worse than {against}'s after {seen} items "
                f"(upper bound {bound:.4g}, level {level:.3g})",
            )
        return Verdict(False, level, f"mean bound {bound:.4g}")
    p_values = {n: looks[n].p_value() for n in names}
    if all(p <= level for p in p_values.values()):
        worst = max(p_values.values())
        return Verdict(
            True,
            level,
            f"dominated by {against} after {seen} items (largest p {worst:.3g} <= level {level:.3g})",
        )
    return Verdict(False, level, "not dominated: " + ", ".join(f"{n} p {p_values[n]:.3g}" for n in names))
