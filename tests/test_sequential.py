"""The paired sequential test of early stopping (olmopt.evaluate.sequential): hand-computed p-values and
its error rates on simulated paired data with known per-item success rates (no model, no zoo)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from olmopt.evaluate.sequential import Boundary, Look, decide, nominal_levels, upper_bound, worse_p_value


def test_sign_test_and_t_test_match_hand_computations() -> None:
    # 0/1 scores: 1 win, 4 losses, 5 ties -> P(Bin(5, 1/2) <= 1) = (1 + 5) / 32
    diffs = [1.0, -1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert worse_p_value(diffs) == pytest.approx(6 / 32)
    assert worse_p_value([0.0, 0.0]) == 1.0  # no discordant item: no evidence
    # continuous: d = -1, -2, -3 -> mean -2, sd 1, t = -2 / (1 / sqrt 3) = -3.4641 with 2 df
    t = -2.0 * math.sqrt(3.0)
    expected = 0.5 * (1.0 + t / math.sqrt(2.0 + t * t))  # the Student t cdf with 2 degrees of freedom
    assert worse_p_value([-1.0, -2.0, -3.0]) == pytest.approx(expected)
    # a tolerance of 2 moves the mean to 0: p = 1/2
    assert worse_p_value([-1.0, -2.0, -3.0], shift=2.0) == pytest.approx(0.5)
    # t bound: mean -2 + t_{0.95, 2} (2.919986) * 1 / sqrt 3
    assert upper_bound([-1.0, -2.0, -3.0], 0.05) == pytest.approx(-2.0 + 2.919986 / math.sqrt(3.0), abs=1e-5)


def test_bonferroni_levels_sum_to_alpha() -> None:
    assert nominal_levels(0.05, 4, "bonferroni") == pytest.approx((0.0125,) * 4)


@pytest.mark.parametrize(
    ("boundary", "published"),
    [  # Lan-DeMets boundaries, 5 equally spaced looks, one-sided 0.025 (Jennison & Turnbull, table 7.6;
        # gsDesign's sfLDPocock / sfLDOF)
        ("pocock", [2.438, 2.427, 2.410, 2.397, 2.386]),
        ("obrien-fleming", [4.877, 3.357, 2.680, 2.290, 2.031]),
    ],
)
def test_spending_boundaries_match_published_values(boundary: Boundary, published: list[float]) -> None:
    from scipy import stats

    z = [float(stats.norm.isf(level)) for level in nominal_levels(0.025, 5, boundary)]
    assert z == pytest.approx(published, abs=0.004)


def test_spending_boundaries_hold_alpha_for_a_gaussian_random_walk() -> None:
    """Monte Carlo of the null: the chance that some look crosses is the spent alpha, not more."""
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(5)
    walks = rng.standard_normal((200_000, 8)).cumsum(axis=1) / np.sqrt(np.arange(1, 9))
    for boundary in ("pocock", "obrien-fleming"):
        z = np.array([stats.norm.isf(level) for level in nominal_levels(0.05, 8, boundary)])
        crossed = float((walks >= z).any(axis=1).mean())
        assert 0.045 <= crossed <= 0.052, (boundary, crossed)


def test_every_objective_must_be_significantly_worse_under_copeland() -> None:
    bad = Look([-1.0] * 12)  # 12 losses: p = 2^-12
    even = Look([1.0, -1.0] * 6)
    assert decide({"a": bad, "b": bad}, 0.001).stop
    assert not decide({"a": bad, "b": even}, 0.001).stop  # better or equal on b: maybe on the front
    assert not decide({"a": bad, "b": Look([-1.0] * 12, shift=None)}, 0.001).stop  # b cannot certify
    # the mean rule: a much worse, b slightly better -> the mean is still worse
    verdict = decide({"a": Look([-1.0, -0.9] * 10), "b": Look([0.05, 0.0] * 10)}, 0.01, score="mean")
    assert verdict.stop and "mean" in verdict.reason


def test_ahead_on_names_the_objectives_a_candidate_may_lead() -> None:
    """Mean oriented difference above 0, a known difference above 0, or nothing to compare yet."""
    from olmopt.evaluate.sequential import ahead_on

    far_behind, slightly_ahead, level = Look([-1.0, -0.9] * 10), Look([0.05, 0.0] * 10), Look([0.0] * 20)
    assert ahead_on({"a": far_behind, "b": slightly_ahead}) == ["b"]
    assert ahead_on({"a": far_behind, "b": level, "c": Look([], known=0.5)}) == ["c"]
    assert ahead_on({"a": far_behind, "b": level, "c": Look([], known=-0.5)}) == []
    assert ahead_on({"a": far_behind, "d": Look([], shift=None)}) == ["d"]  # not scored yet


def test_ahead_on_at_a_level_asks_the_sign_test_for_the_lead() -> None:
    """``level`` < 1: a sampled lead counts when P(Bin(m, 1/2) >= wins) over the m discordant items is at
    most the level: 3 wins to none, 1/8 = 0.125 <= 0.2; 2 to none, 1/4; 4 wins to 1 loss, 6/32 = 0.1875.
    A known lead and an objective not yet scored count at any level."""
    from olmopt.evaluate.sequential import ahead_on, better_p_value

    def look(wins: int, losses: int, ties: int = 15) -> Look:
        return Look([1.0] * wins + [-1.0] * losses + [0.0] * ties)

    assert better_p_value(look(3, 0).diffs) == pytest.approx(0.125)
    assert better_p_value(look(4, 1).diffs) == pytest.approx(6 / 32)
    assert better_p_value(look(0, 0).diffs) == 1.0  # nothing discordant
    behind = Look([-1.0] * 20)
    assert ahead_on({"a": behind, "b": look(2, 0)}) == ["b"]  # any lead at the default level 1
    assert ahead_on({"a": behind, "b": look(2, 0)}, 0.2) == []
    assert ahead_on({"a": behind, "b": look(3, 0), "c": look(4, 1)}, 0.2) == ["b", "c"]
    assert ahead_on({"a": behind, "b": look(3, 0)}, 0.1) == []
    known, unseen = Look([], known=0.01), Look([], shift=None)
    assert ahead_on({"a": behind, "k": known, "u": unseen}, 0.01) == ["k", "u"]
    # other scores: Student t on the negated differences (mean 0.3, sd 0.1 over 10 items: p ~ 1e-6)
    assert ahead_on({"a": behind, "t": Look([0.2, 0.4] * 5)}, 0.001) == ["t"]
    assert ahead_on({"a": behind, "t": Look([0.5, -0.4] * 5)}, 0.2) == []  # mean 0.05, sd ~0.47: p ~ 0.37


def _simulate(
    rng: random.Random,
    delta: float,
    n: int = 200,
    chunk: int = 20,
    alpha: float = 0.05,
    boundary: Boundary = "pocock",
) -> int:
    """Items until the candidate is stopped (n: never). Per-item success rates p_i ~ Beta(2, 1) for the
    incumbent and p_i - delta for the candidate; 80 % of items share their uniform draw (related models)."""
    diffs = []
    for _ in range(n):
        p, u = rng.betavariate(2, 1), rng.random()
        v = u if rng.random() < 0.8 else rng.random()
        diffs.append(float(v < max(0.0, p - delta)) - float(u < p))
    levels = nominal_levels(alpha, n // chunk - 1, boundary)
    for look, seen in enumerate(range(chunk, n, chunk)):
        if decide({"acc": Look(diffs[:seen])}, levels[look]).stop:
            return seen
    return n


@pytest.mark.parametrize(
    ("boundary", "worse_stopped_at_least", "worse_items_at_most"),
    [("pocock", 0.9, 0.55), ("bonferroni", 0.8, 0.65), ("obrien-fleming", 0.9, 0.6)],
)
def test_simulated_error_rates(
    record_property: pytest.RecordProperty,
    boundary: Boundary,
    worse_stopped_at_least: float,
    worse_items_at_most: float,
) -> None:
    rng = random.Random(17)
    runs = 400
    equal = [_simulate(rng, 0.0, boundary=boundary) for _ in range(runs)]
    worse = [_simulate(rng, 0.1, boundary=boundary) for _ in range(runs)]
    wrongly_stopped = sum(s < 200 for s in equal) / runs
    worse_items = sum(worse) / runs
    worse_stopped = sum(s < 200 for s in worse) / runs
    record_property("equal_wrongly_stopped", wrongly_stopped)
    record_property("worse_mean_items", worse_items)
    print(
        f"{boundary}: equal wrongly stopped {wrongly_stopped:.3f}; 0.1 worse: stopped {worse_stopped:.3f}, "
        f"mean items {worse_items:.1f} of 200"
    )
    assert wrongly_stopped <= 0.05  # the bound
    assert worse_stopped >= worse_stopped_at_least
    assert worse_items <= worse_items_at_most * 200


def test_item_scores_pack_and_partial_metrics() -> None:
    from olmopt.evaluate.item_scores import (
        item_attrs,
        metric_of_items,
        pack,
        packed_items,
        unpack,
        unpack_all,
    )

    values = {0: 1.0, 2: 0.25, 3: 0.0}
    assert unpack(pack(values)) == values  # item 1 was not scored: absent again
    attrs = item_attrs({"acc": values, "ppl": {1: 2.5}})
    assert attrs["n_items"] == 4 and set(attrs) == {"i.acc", "i.ppl", "n_items"}
    assert unpack_all(packed_items({**attrs, "m.acc": 0.5})) == {"acc": values, "ppl": {1: 2.5}}
    assert metric_of_items("token_accuracy", values) == pytest.approx(1.25 / 3)
    # perplexity: exp(summed CE / tokens) = exp((2 + 4) / (2 + 1))
    assert metric_of_items("perplexity", {0: 2.0, 1: 4.0}, {0: 2, 1: 1}) == pytest.approx(math.exp(2.0))


def test_paired_looks_orient_by_direction_and_refuse_what_they_cannot_certify() -> None:
    from olmopt.evaluate.item_scores import paired_looks

    cand = {"acc": {0: 1.0, 1: 0.0, 2: 1.0}, "loss": {0: 0.5, 1: 0.7}, "ppl": {0: 3.0}}
    ref = {"acc": {0: 0.0, 1: 1.0}, "loss": {0: 0.2, 1: 0.9}, "ppl": {0: 2.0}}
    directions = {
        "acc": "maximize",
        "loss": "minimize",
        "ppl": "minimize",
        "layers": "maximize",
        "lm": "maximize",
    }
    metric_of = {
        "acc": "token_accuracy",
        "loss": "bigram_loss",
        "ppl": "perplexity",
        "layers": "layers_removed",
    }
    looks = paired_looks(cand, ref, directions, metric_of, known={"layers": -1.0})
    assert list(looks["acc"].diffs) == [1.0, -1.0]  # only the items both scored
    assert list(looks["loss"].diffs) == pytest.approx([-0.3, 0.2])  # lower loss = better: sign flipped
    assert looks["ppl"].shift == 0.0 and looks["layers"].known == -1.0
    assert looks["lm"].shift is None  # no items, not known: never certifies
    tolerant = paired_looks(cand, ref, directions, metric_of, tolerance=0.01)
    assert tolerant["ppl"].shift is None and tolerant["acc"].shift == 0.01


def _chunk_source(values: list[float]):  # noqa: ANN202 - a tiny fake evaluator
    from olmopt.evaluate.early_stop import ChunkResult

    calls: list[int] = []

    def evaluate_chunk(c: int) -> ChunkResult:
        calls.append(c)
        return ChunkResult({"acc": {i: values[i] for i in range(20 * c, 20 * c + 20)}}, {}, [])

    return evaluate_chunk, calls


def test_run_chunks_stops_a_hopeless_candidate_and_keeps_partial_metrics() -> None:
    from olmopt.evaluate.early_stop import StopRule, run_chunks

    rule = StopRule(0.05, {"acc": "maximize"}, {"acc": "token_accuracy"})
    reference = {"acc": dict.fromkeys(range(200), 1.0)}
    evaluate_chunk, calls = _chunk_source([0.0] * 200)
    # 20 losses, no win: p = 2^-20 <= 0.05 / 9 at the first look
    scored = run_chunks(evaluate_chunk, 10, rule, reference)
    assert calls == [0] and scored.n_items == 20
    assert scored.metrics == {"acc": 0.0} and scored.stopped and "chunk 1 of 10" in scored.stopped
    # the same candidate against no reference, or a candidate as good as the reference: every chunk
    evaluate_chunk, calls = _chunk_source([0.0] * 200)
    assert run_chunks(evaluate_chunk, 10, rule, None).n_items == 200 and len(calls) == 10
    evaluate_chunk, calls = _chunk_source([1.0] * 200)
    whole = run_chunks(evaluate_chunk, 10, rule, reference)
    assert whole.stopped is None and whole.metrics == {"acc": 1.0} and len(calls) == 10


def test_run_chunks_spares_a_candidate_ahead_on_one_objective() -> None:
    """Two objectives: the candidate loses every item of ``x`` to the reference and wins one item of ``y``
    in ten. The mean rule stops it at the second look; with ``spare_front`` it is scored on every chunk;
    a candidate that wins nothing is stopped as before, and Copeland's rule is not touched."""
    from olmopt.evaluate.early_stop import ChunkResult, StopRule, run_chunks

    directions, metric_of = {"x": "maximize", "y": "maximize"}, dict.fromkeys("xy", "token_accuracy")
    reference = {"x": dict.fromkeys(range(100), 1.0), "y": dict.fromkeys(range(100), 0.0)}

    def source(wins: int) -> Callable[[int], ChunkResult]:
        def evaluate_chunk(chunk: int) -> ChunkResult:
            idx = range(10 * chunk, 10 * chunk + 10)
            return ChunkResult(
                {"x": dict.fromkeys(idx, 0.0), "y": {i: float(i % 10 < wins) for i in idx}}, {}, []
            )

        return evaluate_chunk

    mean = StopRule(0.05, directions, metric_of, score="mean")
    stopped = run_chunks(source(1), 10, mean, reference)
    assert stopped.stopped and "chunk 2 of 10" in stopped.stopped and stopped.n_items == 40
    spare = replace(mean, spare_front=True)
    whole = run_chunks(source(1), 10, spare, reference)
    assert whole.stopped is None and whole.n_items == 200 and whole.metrics == {"x": 0.0, "y": 0.1}
    level = run_chunks(source(0), 10, spare, reference)  # level on y, behind on x: nothing to spare
    assert level.stopped and "chunk 1 of 10" in level.stopped and "objective mean worse" in level.stopped
    cope = replace(spare, score="copeland")
    assert run_chunks(source(0), 10, cope, reference).stopped is None  # not worse on y: not dominated
    # spare_level 0.2: one win in ten is 2-0 after 20 items (p 1/4), not a lead: stopped where the mean
    # rule stops it; three in ten are 3-0 after the first chunk (p 1/8): spared to the end
    strict = replace(spare, spare_level=0.2)
    thin = run_chunks(source(1), 10, strict, reference)
    assert thin.stopped and "chunk 2 of 10" in thin.stopped and thin.n_items == 40
    clear = run_chunks(source(3), 10, strict, reference)
    assert clear.stopped is None and clear.n_items == 200 and clear.metrics == {"x": 0.0, "y": 0.3}


def test_racing_stops_a_candidate_outside_the_top_third_of_a_rung() -> None:
    from olmopt.evaluate.early_stop import Race, StopRule, run_chunks

    rule = StopRule(0.05, {"acc": "maximize"}, {"acc": "token_accuracy"}, score="mean")
    good = {"acc": dict.fromkeys(range(200), 1.0)}
    half = {"acc": {i: float(i % 2) for i in range(200)}}
    assert Race(3, 1, []).rungs(10) == [1, 3, 9] and Race(2, 2, []).rungs(10) == [2, 4, 8]
    # 3 peers scored 1.0 on every item: a candidate at 0 ranks 4th of 4 at the first rung (top 1 go on)
    evaluate_chunk, calls = _chunk_source([0.0] * 200)
    scored = run_chunks(evaluate_chunk, 10, rule, None, race=Race(3, 1, [good, good, half]))
    assert calls == [0] and scored.n_items == 20 and scored.metrics == {"acc": 0.0}
    assert scored.stopped and "racing: rank 4 of the 4 candidates" in scored.stopped
    # the same candidate with 1 peer (fewer than eta at the rung) or peers that stopped before the rung
    evaluate_chunk, calls = _chunk_source([0.0] * 200)
    assert run_chunks(evaluate_chunk, 10, rule, None, race=Race(3, 1, [good])).stopped is None
    early = {"acc": dict.fromkeys(range(10), 1.0)}  # never reached the first rung (20 items)
    evaluate_chunk, calls = _chunk_source([0.0] * 200)
    assert run_chunks(evaluate_chunk, 10, rule, None, race=Race(3, 1, [early] * 5)).stopped is None
    # a candidate as good as the best goes on at every rung (ties go to the candidate)
    evaluate_chunk, calls = _chunk_source([1.0] * 200)
    whole = run_chunks(evaluate_chunk, 10, rule, None, race=Race(3, 1, [good, good, half, half]))
    assert whole.stopped is None and len(calls) == 10
    # 5 peers: the candidate (0.5 on the rung's items) ranks 3rd of 6; top max(1, 6 // 3) = 2 go on
    evaluate_chunk, calls = _chunk_source([float(i % 2) for i in range(200)])
    zero = {"acc": dict.fromkeys(range(200), 0.0)}
    scored = run_chunks(evaluate_chunk, 10, rule, None, race=Race(3, 1, [good, good, zero, zero, zero]))
    assert scored.stopped and "rank 3 of the 6" in scored.stopped and "top 2 go on" in scored.stopped


def test_mean_bound_matches_a_hand_computation() -> None:
    from scipy import stats

    from olmopt.evaluate.sequential import mean_bound

    # a: d = -1, -2, -3 (mean -2; second moment about 0: 14 / 2); b: d = 0, 1 (mean 0.5; 1 / 1);
    # c known +1 (no variance)
    looks = {"a": Look([-1.0, -2.0, -3.0]), "b": Look([0.0, 1.0]), "c": Look([], known=1.0)}
    se = math.sqrt(7.0 / 3 + 1.0 / 2)
    expected = (-2.0 + 0.5 + 1.0 + float(stats.t.ppf(0.9, 1)) * se) / 3  # df: the smallest n - 1
    assert mean_bound(looks, 0.1) == pytest.approx(expected)
    assert mean_bound({**looks, "d": Look([1.0], shift=None)}, 0.1) == math.inf  # d cannot certify


def _simulate_mean(rng: random.Random, deltas: list[float], n: int = 150, looks: int = 8) -> int:
    """Items per objective until the candidate is stopped under the mean rule (n: never); one 0/1
    objective per delta, shared draws as in ``_simulate``, the Pocock boundary at alpha 0.05."""
    diffs: list[list[float]] = []
    for delta in deltas:
        per = []
        for _ in range(n):
            p, u = rng.betavariate(2, 1), rng.random()
            v = u if rng.random() < 0.8 else rng.random()
            per.append(float(v < max(0.0, p - delta)) - float(u < p))
        diffs.append(per)
    levels = nominal_levels(0.05, looks - 1)
    for look in range(looks - 1):
        seen = round((look + 1) * n / looks)
        verdict = decide({f"o{k}": Look(d[:seen]) for k, d in enumerate(diffs)}, levels[look], "mean")
        if verdict.stop:
            return seen
    return n


def test_mean_rule_error_rates_over_four_objectives() -> None:
    rng = random.Random(3)
    runs = 1000
    equal = [_simulate_mean(rng, [0.0] * 4) for _ in range(runs)]
    worse = [_simulate_mean(rng, [0.2, 0.2, 0.0, 0.0]) for _ in range(runs)]  # the mean 0.1 worse
    wrongly_stopped = sum(s < 150 for s in equal) / runs
    worse_stopped = sum(s < 150 for s in worse) / runs
    print(
        f"mean rule: equal wrongly stopped {wrongly_stopped:.3f}; 0.1 worse on the mean: stopped "
        f"{worse_stopped:.3f}, mean items {sum(worse) / runs:.1f} of 150"
    )
    assert wrongly_stopped <= 0.05
    assert worse_stopped >= 0.9
