"""Choosing among evaluated candidates: ranks, Copeland, Borda, Pareto front, degradation constraints.

``scores`` maps objective -> candidate -> value; ``directions`` maps objective -> "minimize" or
"maximize". A NaN or infinite value (or a missing one) is the worst value whatever the direction.
Everything here is deterministic: no result depends on dict or set order. See docs/selection.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from olmopt.errors import InputError

Scores = Mapping[str, Mapping[str, float]]
Ranks = Mapping[str, Mapping[str, float]]
# (objective, value a, value b, candidate of a, candidate of b) -> the difference is noise
TieRule = Callable[[str, float, float, str, str], bool]

DIRECTIONS = ("minimize", "maximize")
# A finite stand-in for "infinitely violated": Optuna refuses NaN constraints and JSON has no infinity.
NONFINITE_VIOLATION = 1.0e30


def _goodness(value: float | None, direction: str) -> float:
    """Larger is better; NaN, inf and missing values map to -inf (the worst)."""
    if value is None or not math.isfinite(value):
        return -math.inf
    return -value if direction == "minimize" else value


def _direction(directions: Mapping[str, str], objective: str) -> str:
    direction = directions.get(objective)
    if direction not in DIRECTIONS:
        raise InputError(
            f"objective {objective!r}: direction must be minimize or maximize, got {direction!r}"
        )
    return direction


def _candidates(table: Mapping[str, Mapping[str, Any]]) -> list[str]:
    return sorted({c for per_candidate in table.values() for c in per_candidate})


def _value(per: Mapping[str, float], candidate: str) -> float:
    value = per.get(candidate)
    return math.nan if value is None else value


def _beats(
    objective: str,
    a: float,
    b: float,
    direction: str,
    tolerance: float,
    tied: TieRule | None,
    pair: tuple[str, str] = ("", ""),
) -> bool:
    """Whether value ``a`` (of candidate ``pair[0]``) is better than ``b`` (of ``pair[1]``) by more than
    ``tolerance`` and, with ``tied``, not a tie."""
    if _goodness(a, direction) <= _goodness(b, direction) + tolerance:
        return False
    return tied is None or not tied(objective, a, b, *pair)


def rank_table(
    scores: Scores, directions: Mapping[str, str], tolerance: float = 0.0, tied: TieRule | None = None
) -> dict[str, dict[str, float]]:
    """objective -> candidate -> rank (1 = best), competition ranking: equal values share the best rank.

    ``rank = 1 + #candidates that beat it``: better by more than ``tolerance`` (0: strictly better) and,
    with ``tied`` (e.g. ``confidence.ConfidenceTies.tied``), not tied by that rule. Both treat
    differences within evaluation noise as ties. A candidate missing from an objective ranks with the
    worst (non-finite) values there.
    """
    candidates = _candidates(scores)
    table: dict[str, dict[str, float]] = {}
    for objective in sorted(scores):
        direction = _direction(directions, objective)
        value = {c: _value(scores[objective], c) for c in candidates}
        beaten_by = {
            c: sum(
                _beats(objective, value[o], value[c], direction, tolerance, tied, (o, c)) for o in candidates
            )
            for c in candidates
        }
        table[objective] = {c: float(1 + n) for c, n in beaten_by.items()}
    return table


def significance(
    scores: Scores, directions: Mapping[str, str], winner: str, tied: TieRule | None, tolerance: float = 0.0
) -> dict[str, dict[str, str]]:
    """candidate -> objective -> "better" / "worse" / "tie": each other candidate against ``winner``
    under the tie rule and ``tolerance`` (without either, only equal values tie)."""
    table: dict[str, dict[str, str]] = {}
    for c in _candidates(scores):
        if c == winner:
            continue
        row = {}
        for objective in sorted(scores):
            direction = _direction(directions, objective)
            a, w = _value(scores[objective], c), _value(scores[objective], winner)
            if _beats(objective, a, w, direction, tolerance, tied, (c, winner)):
                row[objective] = "better"
            elif _beats(objective, w, a, direction, tolerance, tied, (winner, c)):
                row[objective] = "worse"
            else:
                row[objective] = "tie"
        table[c] = row
    return table


def copeland(ranks: Ranks) -> dict[str, float]:
    """Copeland score per candidate: the number of opponents it beats head to head.

    ``wins[i, j]`` = #objectives where ``rank_i < rank_j``; i beats j when ``wins[i, j] > wins[j, i]``.
    A head-to-head draw counts 0 for both (as in OLM). A missing rank counts as worst.
    """
    candidates = _candidates(ranks)
    rank_of = {c: [ranks[o].get(c, math.inf) for o in sorted(ranks)] for c in candidates}
    score = dict.fromkeys(candidates, 0.0)
    for i, a in enumerate(candidates):
        for b in candidates[i + 1 :]:
            a_wins = sum(ra < rb for ra, rb in zip(rank_of[a], rank_of[b], strict=True))
            b_wins = sum(rb < ra for ra, rb in zip(rank_of[a], rank_of[b], strict=True))
            if a_wins > b_wins:
                score[a] += 1.0
            elif b_wins > a_wins:
                score[b] += 1.0
    return score


def borda(ranks: Ranks) -> dict[str, float]:
    """Sum of ranks per candidate (lower is better); a missing rank adds the number of candidates."""
    candidates = _candidates(ranks)
    worst = float(len(candidates))
    return {c: float(sum(ranks[o].get(c, worst) for o in ranks)) for c in candidates}


def _order(
    candidates: list[str],
    cope: Mapping[str, float],
    bord: Mapping[str, float],
    tie_key: Callable[[str], Any] | None,
) -> list[str]:
    def key(c: str) -> tuple[Any, ...]:
        return (-cope[c], bord[c], tie_key(c) if tie_key else c, c)

    return sorted(candidates, key=key)


def order_candidates(
    scores: Scores, directions: Mapping[str, str], tie_key: Callable[[str], Any] | None = None
) -> list[str]:
    """Candidates best first: Copeland descending, then Borda ascending, then ``tie_key`` (or the name)."""
    ranks = rank_table(scores, directions)
    return _order(_candidates(scores), copeland(ranks), borda(ranks), tie_key)


def pareto_front(
    scores: Scores, directions: Mapping[str, str], tolerance: float = 0.0, tied: TieRule | None = None
) -> list[str]:
    """The non-dominated candidates, sorted by name: x dominates y when no objective has y beating x
    and some objective has x beating y (``_beats``: ties by ``tolerance`` and ``tied``).

    Non-finite values count as worst."""
    candidates = _candidates(scores)
    objectives = sorted(scores)
    directions = {o: _direction(directions, o) for o in objectives}

    def dominates(x: str, y: str) -> bool:
        beats = [
            (_beats(o, _value(scores[o], x), _value(scores[o], y), directions[o], tolerance, tied, (x, y)),
             _beats(o, _value(scores[o], y), _value(scores[o], x), directions[o], tolerance, tied, (y, x)))
            for o in objectives
        ]  # fmt: skip
        return not any(y_wins for _, y_wins in beats) and any(x_wins for x_wins, _ in beats)

    return [c for c in candidates if not any(dominates(other, c) for other in candidates if other != c)]


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select`; ``winner`` is None only when nothing is feasible and no ``keep``."""

    winner: str | None
    order: list[str]
    copeland: dict[str, float]
    borda: dict[str, float]
    ranks: dict[str, dict[str, float]]
    front: list[str]
    feasible: frozenset[str]
    reason: str


def select(
    scores: Scores,
    directions: Mapping[str, str],
    feasible: Mapping[str, bool] | None = None,
    keep: str | None = None,
    tie_key: Callable[[str], Any] | None = None,
    tolerance: float = 0.0,
    score: str = "copeland",
    tied: TieRule | None = None,
) -> Selection:
    """Pick the winner among the feasible candidates.

    Ranks are computed among ALL feasible candidates, then Copeland (Borda, then ``tie_key`` or the name,
    breaking ties) orders them. The winner always lies on the Pareto front of the feasible set: a
    dominating candidate beats everything its dominated rival beats, plus the rival itself. Candidates
    absent from ``feasible`` count as feasible (Optuna's convention). If no candidate is feasible the
    winner is ``keep`` (the incumbent). ``tolerance`` makes differences within it ties (ranks and front),
    and so does ``tied`` for the differences it calls ties (``confidence.ConfidenceTies.tied``).
    ``score="mean"`` orders by the mean of the objective values instead (minimised ones negated; then
    Copeland, Borda and ``tie_key``): the winner is still on the front, as the best mean is never dominated.
    """
    candidates = _candidates(scores)
    ok = frozenset(c for c in candidates if feasible is None or feasible.get(c, True))
    if not ok:
        reason = f"no feasible candidate among {len(candidates)}: keeping {keep!r}"
        return Selection(keep, [], {}, {}, {}, [], ok, reason)
    sub = {o: {c: v for c, v in per.items() if c in ok} for o, per in scores.items()}
    ranks = rank_table(sub, directions, tolerance, tied)
    cope, bord = copeland(ranks), borda(ranks)
    order = _order(sorted(ok), cope, bord, tie_key)
    if score == "mean":
        mean = {c: objective_mean(sub, directions, c) for c in ok}
        order = sorted(order, key=lambda c: -mean[c])  # stable: Copeland order among equal means
    elif score != "copeland":
        raise InputError(f"selection score {score!r}: expected 'copeland' or 'mean'")
    front = pareto_front(sub, directions, tolerance, tied)
    winner = order[0]
    reason = (
        f"{winner!r}: Copeland {cope[winner]:g} of {len(order) - 1}, Borda {bord[winner]:g}, "
        f"{len(ok)} of {len(candidates)} feasible, front of {len(front)}"
    )
    if score == "mean":
        reason = f"{winner!r}: best mean {mean[winner]:.4g}; " + reason.removeprefix(f"{winner!r}: ")
    return Selection(winner, order, cope, bord, ranks, front, ok, reason)


def objective_mean(scores: Scores, directions: Mapping[str, str], candidate: str) -> float:
    """Mean over objectives of ``candidate``'s values, minimised ones negated; non-finite or missing: -inf."""
    total = 0.0
    for objective, per in scores.items():
        value = per.get(candidate)
        if value is None or not math.isfinite(value):
            return -math.inf
        total += value if _direction(directions, objective) == "maximize" else -value
    return total / max(1, len(scores))


def improves_on(
    candidate: Mapping[str, float], reference: Mapping[str, float], directions: Mapping[str, str]
) -> bool:
    """True when ``candidate`` is strictly better than
    ``reference`` on at least one objective (OLM ES test)."""
    return any(
        _goodness(candidate.get(o), _direction(directions, o)) > _goodness(reference.get(o), directions[o])
        for o in sorted(directions)
    )


def _rule_targets(
    rule: str, directions: Mapping[str, str], metric_of: Mapping[str, str]
) -> tuple[list[str], tuple[str, ...]]:
    """(objectives, reference names) that an ``improve_all`` rule constrains."""
    objectives = sorted(directions)
    if rule == "base":
        return objectives, ("base",)
    if rule == "all":
        return objectives, ("base", "incumbent")
    from olmopt.evaluate.metrics import METRIC_ALIASES  # torch: importing select must not load it

    metric = METRIC_ALIASES.get(rule, rule)
    chosen = [o for o in objectives if metric_of.get(o) == metric]
    if not chosen:
        known = ", ".join(sorted(set(metric_of.values())))
        raise InputError(
            f"improve_all {rule!r} matches no objective (use base, all, or a metric of: {known})"
        )
    return chosen, ("base", "incumbent")


def _worse_by(value: float | None, reference: float | None, direction: str) -> float:
    """How much worse ``value`` is than ``reference`` (positive = worse); non-finite handled."""
    if value is None or not math.isfinite(value):
        return NONFINITE_VIOLATION
    if reference is None or not math.isfinite(reference):
        return 0.0  # no usable reference: nothing to be worse than
    diff = value - reference if direction == "minimize" else reference - value
    return max(-NONFINITE_VIOLATION, min(NONFINITE_VIOLATION, diff))


def degradation_constraints(
    candidate: Mapping[str, float],
    references: Mapping[str, Mapping[str, float]],
    directions: Mapping[str, str],
    rule: str | None,
    metric_of: Mapping[str, str],
) -> dict[str, float]:
    """OLM's ``improve_all`` as Optuna constraints (value <= 0 is feasible), one per (objective, reference).

    ``rule``: None/"" -> none; "base" -> every objective no worse than ``references["base"]``; "all" ->
    no worse than the base and ``references["incumbent"]``; a metric name (or the seed aliases "bigram",
    "exact") -> only the objectives of that metric, against base and incumbent. The name is
    ``"{objective}.vs_{reference}"`` and the value is how much worse the candidate is (signed by
    direction). A non-finite or missing candidate value is violated (``NONFINITE_VIOLATION``); a
    non-finite or missing reference value constrains nothing (0.0). A missing "incumbent" reference is
    skipped (at the start the incumbent is the base); a missing "base" is an error.
    """
    if not rule:
        return {}
    objectives, wanted = _rule_targets(rule.strip(), directions, metric_of)
    if "base" not in references:
        raise ValueError("degradation_constraints: references must contain 'base'")
    constraints: dict[str, float] = {}
    for ref_name in wanted:
        reference = references.get(ref_name)
        if reference is None:
            continue
        for objective in objectives:
            direction = _direction(directions, objective)
            value = _worse_by(candidate.get(objective), reference.get(objective), direction)
            constraints[f"{objective}.vs_{ref_name}"] = value
    return constraints


def is_feasible(constraints: Mapping[str, float]) -> bool:
    """True when every constraint value is <= 0 (NaN is infeasible); no constraints is feasible."""
    return all(v <= 0 for v in constraints.values())
