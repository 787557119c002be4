"""Ties by confidence: Wilson and Newcombe intervals against hand computations, and selection with them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from olmopt.bootstrap import PairedBootstrap, bootstrap_seed
from olmopt.confidence import (
    Comparison,
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
    # a fixed tolerance ties what selection ties: mc differs by 0.06, fact by 0.25
    by_tolerance = significance(scores, directions, "keep", None, tolerance=0.1)
    assert by_tolerance == {"cand": {"fact": "better", "mc": "tie"}}


def test_paired_bootstrap_matches_the_enumerated_distribution() -> None:
    """4 items: the 4^4 equally likely draws give the exact distribution of the resampled mean; its 10 % and
    90 % quantiles (0.5 and 2.5, well away from the jumps of the CDF) are the 80 % interval."""
    d = [0.0, 1.0, 1.0, 4.0]
    means = sorted(sum(d[i] for i in draw) / 4 for draw in itertools.product(range(4), repeat=4))
    exact = (means[math.ceil(0.1 * 256) - 1], means[math.ceil(0.9 * 256) - 1])
    assert exact == (0.5, 2.5)
    boot = PairedBootstrap("loss", range(4))
    assert boot.interval(dict(enumerate(d)), dict.fromkeys(range(4), 0.0), 0.8) == exact
    # the interval is of a - b: shifting both by the same per-item values changes nothing
    shift = {i: 10.0 * i for i in range(4)}
    a = {i: d[i] + shift[i] for i in range(4)}
    assert boot.interval(a, shift, 0.8) == pytest.approx(exact)


def test_paired_bootstrap_of_many_items_is_the_normal_interval() -> None:
    """400 differences: the percentile interval is close to mean +- z * sd / sqrt(n) (sd with 1/n)."""
    rng = np.random.default_rng(7)
    diffs = rng.normal(0.1, 1.0, 400)
    mean, sd = float(diffs.mean()), float(diffs.std())
    half = z_value(0.95) * sd / math.sqrt(400)
    low, high = PairedBootstrap("loss", range(400)).interval(
        dict(enumerate(diffs)), dict.fromkeys(range(400), 0.0)
    )
    assert low == pytest.approx(mean - half, abs=0.1 * half) and high == pytest.approx(
        mean + half, abs=0.1 * half
    )


def test_perplexity_is_resampled_as_the_ratio_of_summed_cross_entropy_to_tokens() -> None:
    """2 items (tokens 1 and 3): the draws {2x item 0, item 0 + item 1, 2x item 1} have probabilities
    1/4, 1/2, 1/4; the 40 % interval is the middle one, exp((2 + 3) / 4) - exp((1 + 3) / 4)."""
    boot = PairedBootstrap("ppl", [0, 1], tokens={0: 1, 1: 3})
    middle = math.exp(5 / 4) - math.exp(1.0)
    assert boot.interval({0: 2.0, 1: 3.0}, {0: 1.0, 1: 3.0}, 0.4) == pytest.approx((middle, middle))
    assert PairedBootstrap("ppl", [1], tokens={1: 3}).interval({1: 6.0}, {1: 3.0}) == pytest.approx(
        (math.exp(2.0) - math.exp(1.0),) * 2
    )  # one item: every resample is that item
    overflow = PairedBootstrap("ppl", [0], tokens={0: 1}).interval({0: 800.0}, {0: 1.0})
    assert overflow is None  # an infinite perplexity has no interval


def test_bootstrap_ties_losses_of_equal_quality_and_separates_different_ones() -> None:
    rng = np.random.default_rng(3)
    truth = rng.uniform(0.5, 1.5, 80)  # per-item difficulty, shared by every candidate
    same1, same2 = truth + rng.normal(0, 0.2, 80), truth + rng.normal(0, 0.2, 80)
    worse = truth + 0.15 + rng.normal(0, 0.2, 80)
    per = {"loss": {"x": dict(enumerate(same1)), "y": dict(enumerate(same2)), "z": dict(enumerate(worse))}}
    _, rule = selection_ties(None, 0.95, {"loss": "bigram_loss"}, {"loss": 80}, per)
    assert rule is not None
    mean = {c: float(np.mean(list(v.values()))) for c, v in per["loss"].items()}
    tie = rule.compare("loss", mean["x"], mean["y"], "x", "y")
    assert tie.rule == "bootstrap" and tie.tied and tie.interval is not None
    assert tie.interval[0] < mean["x"] - mean["y"] < tie.interval[1]
    apart = rule.compare("loss", mean["z"], mean["x"], "z", "x")
    assert (
        apart.rule == "bootstrap" and not apart.tied and apart.interval is not None and apart.interval[0] > 0
    )
    assert not rule.tied("loss", mean["x"], mean["z"], "x", "z")
    # deterministic: a new rule over the same values gives the same interval
    _, again = selection_ties(None, 0.95, {"loss": "bigram_loss"}, {"loss": 80}, per)
    assert again is not None and again.compare("loss", mean["x"], mean["y"], "x", "y") == tie
    # a candidate without per-item values: by value only
    assert rule.compare("loss", 0.3, 0.3, "x", "w") == Comparison("equal", None, True)
    assert rule.compare("loss", 0.31, 0.3, "x", "w") == Comparison("equal", None, False)


def test_selection_ties_bootstrap_only_where_it_can() -> None:
    metric_of = {"mc": "mc_accuracy", "ppl": "perplexity", "loss": "bigram_loss"}
    per = {o: {"x": {0: 1.0}} for o in metric_of}
    _, rule = selection_ties(None, 0.95, metric_of, {"mc": 40, "ppl": 40, "loss": 40}, per)
    assert rule is not None and set(rule.items) == {"loss"}  # mc: Newcombe; ppl: no token counts
    _, rule = selection_ties(None, 0.95, metric_of, {"mc": 40}, per, {"ppl": {0: 3}})
    assert rule is not None and set(rule.items) == {"loss", "ppl"} and rule.tokens == {"ppl": {0: 3}}
    assert selection_ties(0.01, 0.95, metric_of, {"mc": 40}, per) == (0.01, None)
    assert bootstrap_seed("loss", [0, 1]) != bootstrap_seed("ppl", [0, 1]) != bootstrap_seed("ppl", [0, 2])
