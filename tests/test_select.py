"""Ranks, Copeland, Borda, Pareto front, selection and degradation constraints on hand-made tables."""

from __future__ import annotations

import math
import random

import pytest

from olmopt.errors import InputError
from olmopt.select import (
    NONFINITE_VIOLATION,
    borda,
    copeland,
    degradation_constraints,
    improves_on,
    is_feasible,
    order_candidates,
    pareto_front,
    rank_table,
    select,
)

MIN3 = {"d1": "minimize", "d2": "minimize", "d3": "minimize"}


def _shuffled(scores: dict[str, dict[str, float]], seed: int) -> dict[str, dict[str, float]]:
    """The same table with objectives and candidates inserted in a random order."""
    rng = random.Random(seed)
    objectives = list(scores)
    rng.shuffle(objectives)
    out = {}
    for o in objectives:
        items = list(scores[o].items())
        rng.shuffle(items)
        out[o] = dict(items)
    return out


def test_rank_table_competition_ranking_and_worst_nonfinite() -> None:
    scores = {
        "loss": {"a": 0.5, "b": 0.5, "c": 0.7, "d": math.nan, "e": math.inf},
        "acc": {"a": 0.9, "b": math.inf, "c": 0.9, "d": 0.1, "e": 0.5},
    }
    ranks = rank_table(scores, {"loss": "minimize", "acc": "maximize"})
    assert ranks["loss"] == {"a": 1.0, "b": 1.0, "c": 3.0, "d": 4.0, "e": 4.0}
    # +inf is worst even when maximizing
    assert ranks["acc"] == {"a": 1.0, "b": 5.0, "c": 1.0, "d": 4.0, "e": 3.0}


def test_missing_candidate_ranks_worst() -> None:
    ranks = rank_table(
        {"x": {"a": 1.0, "b": 2.0}, "y": {"a": 1.0, "c": 0.5}}, {"x": "minimize", "y": "minimize"}
    )
    assert ranks["x"] == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert ranks["y"] == {"a": 2.0, "b": 3.0, "c": 1.0}


def test_unknown_direction_is_input_error() -> None:
    with pytest.raises(InputError, match="minimize or maximize"):
        rank_table({"x": {"a": 1.0}}, {"x": "lower"})


def test_copeland_and_borda_hand_table_with_ties() -> None:
    # Ranks by hand (3 objectives, 4 candidates).
    ranks = {
        "d1": {"a": 1, "b": 2, "c": 3, "d": 4},
        "d2": {"a": 2, "b": 1, "c": 3, "d": 3},
        "d3": {"a": 3, "b": 1, "c": 2, "d": 4},
    }
    # a vs b: a wins d1, b wins d2,d3 -> b. a vs c: a wins d1,d2; c wins d3 -> a. a vs d: a all -> a.
    # b vs c: b wins all -> b. b vs d: b all -> b. c vs d: c wins d1,d3; d2 tie -> c.
    assert copeland(ranks) == {"a": 2.0, "b": 3.0, "c": 1.0, "d": 0.0}
    assert borda(ranks) == {"a": 6.0, "b": 4.0, "c": 8.0, "d": 11.0}


def test_copeland_draw_counts_zero() -> None:
    ranks = {"d1": {"a": 1, "b": 2}, "d2": {"a": 2, "b": 1}}
    assert copeland(ranks) == {"a": 0.0, "b": 0.0}


def test_order_breaks_ties_by_borda_then_name_and_ignores_input_order() -> None:
    # Condorcet cycle a > b > c > a: Copeland 1 each; Borda a=5, b=6, c=7... built below.
    scores = {
        "d1": {"a": 1, "b": 2, "c": 3, "z": 9},
        "d2": {"a": 2, "b": 3, "c": 1, "z": 9},
        "d3": {"a": 3, "b": 1, "c": 2, "z": 9},
    }
    # cycle: a beats b (d1,d2), b beats c (d1,d3), c beats a (d2,d3); everyone beats z.
    ranks = rank_table(scores, MIN3)
    assert copeland(ranks) == {"a": 2.0, "b": 2.0, "c": 2.0, "z": 0.0}
    assert borda(ranks)["a"] == borda(ranks)["b"] == 6.0
    expected = ["a", "b", "c", "z"]
    for seed in range(8):
        assert order_candidates(_shuffled(scores, seed), MIN3) == expected
    # a tie key overrides the name order among full ties
    assert order_candidates(scores, MIN3, tie_key=lambda c: {"a": 2, "b": 0, "c": 1, "z": 3}[c]) == [
        "b",
        "c",
        "a",
        "z",
    ]


def test_borda_breaks_copeland_tie() -> None:
    scores = {
        "d1": {"p": 1.0, "q": 2.0, "r": 3.0},
        "d2": {"p": 3.0, "q": 1.0, "r": 2.0},
        "d3": {"p": 2.0, "q": 3.0, "r": 1.0},
        "d4": {"p": 1.0, "q": 1.0, "r": 3.0},
    }
    # p vs q: p d1,d3 / q d2 -> p. q vs r: q d1,d2,d4 / r d3 -> q. p vs r: p d1,d4 / r d2,d3 -> draw.
    ranks = rank_table(scores, dict.fromkeys(scores, "minimize"))
    assert copeland(ranks) == {"p": 1.0, "q": 1.0, "r": 0.0}
    assert borda(ranks) == {"p": 7.0, "q": 7.0, "r": 9.0}
    assert order_candidates(scores, dict.fromkeys(scores, "minimize")) == ["p", "q", "r"]


def test_pareto_front_mixed_directions() -> None:
    scores = {
        "loss": {"a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0, "e": math.nan},
        "acc": {"a": 0.8, "b": 0.9, "c": 0.1, "d": 0.7, "e": 1.0},
    }
    # d is dominated by a (same loss, lower acc); e has NaN loss but the best acc -> still on the front.
    directions = {"loss": "minimize", "acc": "maximize"}
    assert pareto_front(scores, directions) == ["a", "b", "c", "e"]
    assert pareto_front(_shuffled(scores, 3), directions) == ["a", "b", "c", "e"]


def test_select_feasible_only_and_winner_on_front() -> None:
    scores = {
        "d1": {"base": 1.0, "x": 0.5, "y": 0.4, "z": 0.9},
        "d2": {"base": 1.0, "x": 0.5, "y": 2.0, "z": 0.6},
    }
    sel = select(scores, {"d1": "minimize", "d2": "minimize"}, feasible={"y": False})
    assert sel.feasible == frozenset({"base", "x", "z"})
    assert sel.winner == "x"
    assert sel.order == ["x", "z", "base"]
    assert sel.front == ["x"]
    assert sel.copeland == {"base": 0.0, "x": 2.0, "z": 1.0}
    assert sel.ranks["d1"] == {"base": 3.0, "x": 1.0, "z": 2.0}
    assert sel.winner in sel.front


def test_select_keeps_incumbent_when_nothing_feasible() -> None:
    scores = {"d1": {"x": 0.1, "y": 0.2}}
    sel = select(scores, {"d1": "minimize"}, feasible={"x": False, "y": False}, keep="incumbent")
    assert sel.winner == "incumbent"
    assert sel.order == [] and sel.feasible == frozenset()
    assert "keeping 'incumbent'" in sel.reason


def test_select_is_independent_of_input_order() -> None:
    scores = {
        "d1": {"a": 0.3, "b": 0.3, "c": 0.1, "d": 0.9},
        "d2": {"a": 0.2, "b": 0.2, "c": 0.8, "d": 0.1},
        "d3": {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5},
    }
    first = select(scores, MIN3)
    assert first.winner == "a"  # a and b tie everywhere: the name decides
    for seed in range(6):
        assert select(_shuffled(scores, seed), MIN3).order == first.order


REFS = {
    "base": {"math.exact_match": 0.8, "chat.diversity": 10.0, "qa.token_accuracy": 0.5},
    "incumbent": {"math.exact_match": 0.6, "chat.diversity": 12.0, "qa.token_accuracy": 0.7},
}
DIRS = {"math.exact_match": "minimize", "chat.diversity": "minimize", "qa.token_accuracy": "maximize"}
METRIC_OF = {
    "math.exact_match": "exact_match",
    "chat.diversity": "diversity",
    "qa.token_accuracy": "token_accuracy",
}


def test_no_rule_no_constraints() -> None:
    assert degradation_constraints({"math.exact_match": 9.0}, REFS, DIRS, None, METRIC_OF) == {}
    assert degradation_constraints({"math.exact_match": 9.0}, REFS, DIRS, "", METRIC_OF) == {}
    assert is_feasible({})


def test_base_rule_rejects_a_degrading_candidate() -> None:
    cand = {"math.exact_match": 0.7, "chat.diversity": 11.0, "qa.token_accuracy": 0.6}
    got = degradation_constraints(cand, REFS, DIRS, "base", METRIC_OF)
    assert got == pytest.approx(
        {"chat.diversity.vs_base": 1.0, "math.exact_match.vs_base": -0.1, "qa.token_accuracy.vs_base": -0.1}
    )
    assert not is_feasible(got)
    better = dict(cand, **{"chat.diversity": 10.0})  # equal to the base is allowed
    assert is_feasible(degradation_constraints(better, REFS, DIRS, "base", METRIC_OF))


def test_all_rule_checks_base_and_incumbent() -> None:
    cand = {"math.exact_match": 0.7, "chat.diversity": 9.0, "qa.token_accuracy": 0.6}
    got = degradation_constraints(cand, REFS, DIRS, "all", METRIC_OF)
    assert len(got) == 6
    assert got["math.exact_match.vs_incumbent"] == pytest.approx(0.1)
    assert got["qa.token_accuracy.vs_incumbent"] == pytest.approx(0.1)  # maximize: 0.7 - 0.6
    assert got["math.exact_match.vs_base"] == pytest.approx(-0.1)
    assert not is_feasible(got)


def test_metric_rule_and_seed_alias() -> None:
    cand = {"math.exact_match": 0.5, "chat.diversity": 99.0, "qa.token_accuracy": 0.0}
    got = degradation_constraints(cand, REFS, DIRS, "exact", METRIC_OF)  # the seed's "exact" now works
    assert got == pytest.approx({"math.exact_match.vs_base": -0.3, "math.exact_match.vs_incumbent": -0.1})
    assert is_feasible(got)  # diversity and accuracy degrade, but the rule only guards exact_match
    assert degradation_constraints(cand, REFS, DIRS, "exact_match", METRIC_OF) == got


def test_unknown_rule_is_input_error() -> None:
    with pytest.raises(InputError, match="improve_all 'bigram' matches no objective"):
        degradation_constraints({}, REFS, DIRS, "bigram", METRIC_OF)


def test_nan_candidate_is_violated_and_missing_incumbent_skipped() -> None:
    cand = {"math.exact_match": math.nan, "chat.diversity": 1.0, "qa.token_accuracy": math.inf}
    got = degradation_constraints(cand, {"base": REFS["base"]}, DIRS, "all", METRIC_OF)
    assert set(got) == {"math.exact_match.vs_base", "chat.diversity.vs_base", "qa.token_accuracy.vs_base"}
    assert got["math.exact_match.vs_base"] == NONFINITE_VIOLATION
    assert got["qa.token_accuracy.vs_base"] == NONFINITE_VIOLATION
    assert all(math.isfinite(v) for v in got.values())
    assert not is_feasible(got)


def test_nonfinite_reference_constrains_nothing() -> None:
    refs = {"base": {"math.exact_match": math.inf}}
    got = degradation_constraints(
        {"math.exact_match": 1.9}, refs, {"math.exact_match": "minimize"}, "base", METRIC_OF
    )
    assert got == {"math.exact_match.vs_base": 0.0}


def test_is_feasible_nan_is_infeasible() -> None:
    assert is_feasible({"a": 0.0, "b": -1.0})
    assert not is_feasible({"a": math.nan})


def test_improves_on_any_objective() -> None:
    ref = {"math.exact_match": 0.6, "chat.diversity": 12.0, "qa.token_accuracy": 0.7}
    assert improves_on(
        {"math.exact_match": 0.9, "chat.diversity": 20.0, "qa.token_accuracy": 0.71}, ref, DIRS
    )
    assert not improves_on(dict(ref), ref, DIRS)
    assert not improves_on(
        {"math.exact_match": math.nan}, {"math.exact_match": 0.6}, {"math.exact_match": "minimize"}
    )


def test_tolerance_turns_noise_into_ties() -> None:
    scores = {"fact": {"keep": 0.00, "cand": 0.05}, "mc": {"keep": 0.755, "cand": 0.750}}
    directions = {"fact": "maximize", "mc": "maximize"}
    strict = select(scores, directions, keep="keep", tie_key=lambda c: c != "keep")
    assert strict.copeland == {"keep": 0.0, "cand": 0.0} and strict.winner == "keep"
    noisy = select(scores, directions, keep="keep", tie_key=lambda c: c != "keep", tolerance=0.01)
    assert noisy.copeland == {"keep": 0.0, "cand": 1.0} and noisy.winner == "cand"
    assert noisy.ranks["mc"] == {"keep": 1.0, "cand": 1.0}
    assert pareto_front(scores, directions, tolerance=0.01) == ["cand"]
    assert pareto_front(scores, directions) == ["cand", "keep"]


def test_mean_score_counts_magnitudes_where_copeland_counts_wins() -> None:
    """x wins two objectives by a hair and loses one by a lot: Copeland prefers it, the mean does not."""
    from olmopt.select import objective_mean

    scores = {"add": {"x": 0.51, "y": 0.50}, "rev": {"x": 0.31, "y": 0.30}, "fact": {"x": 0.05, "y": 0.45}}
    directions = dict.fromkeys(scores, "maximize")
    assert select(scores, directions).winner == "x"
    chosen = select(scores, directions, score="mean")
    assert chosen.winner == "y"
    assert objective_mean(scores, directions, "y") == pytest.approx((0.50 + 0.30 + 0.45) / 3)
    assert chosen.reason.startswith("'y': best mean 0.4167")
    # minimised objectives count negated; a non-finite value makes the mean the worst
    assert objective_mean({"ppl": {"a": 2.0}}, {"ppl": "minimize"}, "a") == -2.0
    assert objective_mean({"acc": {"a": float("nan")}}, {"acc": "maximize"}, "a") == float("-inf")
