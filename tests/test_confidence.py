"""Ties by confidence: Wilson and Newcombe intervals against hand computations, and selection with them."""

from __future__ import annotations

import math

import pytest

from olmopt.confidence import (
    ConfidenceTies,
    difference_interval,
    proportion_counts,
    selection_ties,
    wilson,
    z_value,
)
from olmopt.errors import InputError
from olmopt.select import pareto_front, select, significance


def test_wilson_interval_by_hand() -> None:
    # 50 of 100, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.0025 + 1.96^2 / 40000) / (1 + 1.96^2 / 100)
    z = z_value(0.95)
    assert z == pytest.approx(1.959964, abs=1e-6)
    half = z * math.sqrt(0.0025 + z * z / 40000) / (1 + z * z / 100)
    assert wilson(0.5, 100) == pytest.approx((0.5 - half, 0.5 + half))
    assert wilson(0.5, 100) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    low, high = wilson(0.0, 10)  # Wilson never leaves [0, 1], and 0 of 10 still admits ~28 %
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(z * z / 10 / (1 + z * z / 10))
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        z_value(1.0)


def test_newcombe_difference_matches_the_paper() -> None:
    """Newcombe (1998), example (a): 56/70 - 48/80, method 10: [0.0524, 0.3339]."""
    low, high = difference_interval(56 / 70, 70, 48 / 80, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def test_confidence_ties_decide_by_the_interval() -> None:
    ties = ConfidenceTies({"mc": 100})
    # 0.60 vs 0.50 on 100 items: interval [-0.0373, 0.2321] holds 0 -> tie; 0.70 vs 0.50 does not
    assert difference_interval(0.6, 100, 0.5, 100) == pytest.approx((-0.0373, 0.2321), abs=1e-4)
    assert ties.tied("mc", 0.6, 0.5) and ties.tied("mc", 0.5, 0.6)
    assert not ties.tied("mc", 0.7, 0.5)
    # the same 0.1 with 1000 items each is significant; at 50 % confidence 0.60 vs 0.50 is too
    assert not ConfidenceTies({"mc": 1000}).tied("mc", 0.6, 0.5)
    assert not ConfidenceTies({"mc": 100}, level=0.5).tied("mc", 0.6, 0.5)
    # objectives without a count (losses) tie only when equal; non-finite values tie with each other
    assert not ties.tied("loss", 0.31, 0.30) and ties.tied("loss", 0.3, 0.3)
    assert ties.tied("mc", math.nan, math.inf) and not ties.tied("mc", math.nan, 0.5)
    assert not ties.tied("mc", 1.5, 0.5)  # not a share: compared by value


def test_only_accuracy_like_objectives_get_intervals() -> None:
    metric_of = {"mc": "mc_accuracy", "add": "token_accuracy", "chat": "bigram_loss"}
    assert proportion_counts(metric_of, {"mc": 40, "add": 0, "chat": 40}) == {"mc": 40}
    assert selection_ties(0.01, 0.95, metric_of, {"mc": 40}) == (0.01, None)
    tolerance, rule = selection_ties(None, 0.9, metric_of, {"mc": 40, "chat": 40})
    assert tolerance == 0.0 and rule == ConfidenceTies({"mc": 40}, 0.9)


def test_selection_keeps_the_incumbent_within_the_interval() -> None:
    """cand beats keep by 6 points on 100 items (noise) and 25 points on fact (significant at n=100)."""
    scores = {"mc": {"keep": 0.60, "cand": 0.66}, "fact": {"keep": 0.40, "cand": 0.65}}
    directions = {"mc": "maximize", "fact": "maximize"}
    prefer_keep = {"keep": "keep", "tie_key": lambda c: c != "keep"}
    by_value = select(scores, directions, **prefer_keep)  # type: ignore[arg-type]
    assert by_value.winner == "cand"
    only_mc = ConfidenceTies({"mc": 100})  # fact has no count: compared by value
    chosen = select(scores, directions, tied=only_mc.tied, **prefer_keep)  # type: ignore[arg-type]
    assert chosen.winner == "cand"
    noisy = ConfidenceTies({"mc": 100, "fact": 20})  # 0.65 vs 0.40 on 20 items: [-0.05, 0.49] holds 0
    chosen = select(scores, directions, tied=noisy.tied, **prefer_keep)  # type: ignore[arg-type]
    assert chosen.winner == "keep"
    assert chosen.ranks == {"fact": {"cand": 1.0, "keep": 1.0}, "mc": {"cand": 1.0, "keep": 1.0}}
    assert pareto_front(scores, directions, tied=noisy.tied) == ["cand", "keep"]
    assert pareto_front(scores, directions, tied=only_mc.tied) == ["cand"]
    assert significance(scores, directions, "keep", only_mc.tied) == {"cand": {"fact": "better", "mc": "tie"}}
    assert significance(scores, directions, "keep", None) == {"cand": {"fact": "better", "mc": "better"}}
