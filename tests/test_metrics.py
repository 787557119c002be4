"""Metrics against hand computations on a 3-token vocabulary with known softmax values."""

from __future__ import annotations

import math

import pytest
import torch

from olmopt.errors import InputError
from olmopt.evaluate import metrics as M

torch.set_num_threads(1)

# Probabilities chosen by hand; logits = log(p) so softmax(logits) == p exactly up to rounding.
PROBS = torch.tensor(
    [
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]],  # labels 0, 2, 2: right, wrong, right
        [[0.6, 0.3, 0.1], [0.25, 0.25, 0.5], [0.4, 0.4, 0.2]],  # labels 0, 2, pad
    ]
)
LOGITS = torch.log(PROBS)
TARGET = torch.tensor([[0, 2, 2], [0, 2, 99]])  # 99: a padding id that must never be gathered
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_registry_directions_and_kinds() -> None:
    expected = {
        "exact_match": ("minimize", "generate"),
        "accuracy": ("maximize", "generate"),
        "token_accuracy": ("maximize", "teacher_forced"),
        "bigram_loss": ("minimize", "teacher_forced"),
        "perplexity": ("minimize", "teacher_forced"),
        "diversity": ("minimize", "generate"),
        "quality": ("minimize", "generate"),
        "mc_accuracy": ("maximize", "choice"),
        "layers_removed": ("maximize", "recipe"),
    }
    assert {n: (s.direction, s.kind) for n, s in M.METRICS.items()} == expected
    assert M.get_metric("perplexity").name == "perplexity"


def test_unknown_metric_is_input_error() -> None:
    with pytest.raises(InputError, match=r"unknown metric 'x' \(choose from accuracy, bigram_loss"):
        M.get_metric("x")
    assert InputError("x").exit_code == 2


def test_token_stats_match_hand_values() -> None:
    stats = M.token_stats(LOGITS, TARGET, MASK)
    assert torch.allclose(stats.max_prob[0], torch.tensor([0.7, 0.5, 0.8]))
    assert torch.allclose(stats.label_logprob[0], torch.log(torch.tensor([0.7, 0.3, 0.8])))
    assert stats.right[0].tolist() == [True, False, True]
    assert stats.right[1, :2].tolist() == [True, True]


def test_bigram_loss_hand_computed() -> None:
    # row 0: s = [1-0.7, 1 (wrong), 1-0.8] = [0.3, 1, 0.2]; pairs 1.3, 1.2 -> 1.25
    # row 1: s = [0.4, 0.5]; one pair 0.9 (the padded third position is ignored)
    got = M.bigram_loss_scores(LOGITS, TARGET, MASK)
    assert torch.allclose(got, torch.tensor([1.25, 0.9]))


def test_bigram_loss_single_token_counts_in_both_windows() -> None:
    mask = torch.tensor([[True, False, False]])
    got = M.bigram_loss_scores(LOGITS[:1], TARGET[:1], mask)
    assert torch.allclose(got, torch.tensor([0.6]))  # 2 * (1 - 0.7)


def test_bigram_loss_bf16_logits_upcast() -> None:
    got = M.bigram_loss_scores(LOGITS.bfloat16(), TARGET, MASK)
    assert got.dtype == torch.float32
    assert torch.allclose(got, torch.tensor([1.25, 0.9]), atol=1e-2)


def test_cross_entropy_sums_and_perplexity() -> None:
    sums, counts = M.cross_entropy_sums(LOGITS, TARGET, MASK)
    row0 = -(math.log(0.7) + math.log(0.3) + math.log(0.8))  # 1.78379
    row1 = -(math.log(0.6) + math.log(0.5))  # 1.20397
    assert torch.allclose(sums, torch.tensor([row0, row1]))
    assert counts.tolist() == [3, 2]
    ppl = M.perplexity_from_sums(row0 + row1, 5)
    assert ppl == pytest.approx(math.exp((row0 + row1) / 5))  # 1.81800, not a mean of per-sample ppl
    assert M.aggregate("perplexity", sums, counts) == pytest.approx(ppl)


def test_perplexity_edge_cases() -> None:
    assert math.isnan(M.perplexity_from_sums(0.0, 0))
    assert M.perplexity_from_sums(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="token_counts"):
        M.aggregate("perplexity", [1.0])


def test_token_accuracy_all_positions_must_be_right() -> None:
    assert M.token_accuracy_scores(LOGITS, TARGET, MASK).tolist() == [0.0, 1.0]


def test_token_accuracy_tie_goes_to_first_index() -> None:
    logits = torch.zeros(1, 1, 3)  # uniform: greedy picks token 0
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert M.token_accuracy_scores(logits, torch.tensor([[0]]), mask).tolist() == [1.0]
    assert M.token_accuracy_scores(logits, torch.tensor([[2]]), mask).tolist() == [0.0]


def _rollout(pred: list[int], pmax: list[float], target: list[int]) -> tuple[torch.Tensor, ...]:
    return (
        torch.tensor([pred]),
        torch.tensor([pmax]),
        torch.tensor([target]),
        torch.ones(1, len(target), dtype=torch.bool),
    )


def test_exact_match_right_answer_is_mean_uncertainty() -> None:
    got = M.exact_match_scores(*_rollout([5, 6, 7, 8], [0.9, 0.8, 1.0, 0.7], [5, 6, 7, 8]))
    assert got.item() == pytest.approx((0.1 + 0.2 + 0.0 + 0.3) / 4)  # 0.15


def test_exact_match_stops_at_first_mismatch() -> None:
    # mismatch at k=1 of n=4, p=0.6 there; positions 2, 3 hold garbage (NaN) and are ignored
    pred, pmax, target, mask = _rollout([5, 9, 0, 0], [0.9, 0.6, math.nan, math.nan], [5, 6, 7, 8])
    got = M.exact_match_scores(pred, pmax, target, mask)
    assert got.item() == pytest.approx(1 + (4 - 1 - 1 + 0.6) / 4)  # 1.65


def test_exact_match_order_certain_right_uncertain_right_wrong() -> None:
    certain_right = M.exact_match_scores(*_rollout([1, 2], [0.99, 0.99], [1, 2])).item()
    unsure_right = M.exact_match_scores(*_rollout([1, 2], [0.34, 0.34], [1, 2])).item()
    late_unsure_wrong = M.exact_match_scores(*_rollout([1, 3], [0.99, 0.01], [1, 2])).item()
    late_sure_wrong = M.exact_match_scores(*_rollout([1, 3], [0.99, 0.99], [1, 2])).item()
    early_wrong = M.exact_match_scores(*_rollout([3, 2], [0.5, 0.99], [1, 2])).item()
    assert certain_right < unsure_right < 1.0 < late_unsure_wrong < late_sure_wrong < early_wrong
    assert late_unsure_wrong == pytest.approx(1.005)
    assert early_wrong == pytest.approx(1.75)


def test_exact_match_seed_mode_compares_every_position() -> None:
    # OLM HEAD: right -> 1 - p, wrong -> 1 + p, mean: (0.1 + 1.6 + 0.5) / 3
    args = _rollout([5, 9, 7], [0.9, 0.6, 0.5], [5, 6, 7])
    got = M.exact_match_scores(*args, stop_at_first_mismatch=False)
    assert got.item() == pytest.approx(2.2 / 3)


def test_exact_match_ignores_padding() -> None:
    pred = torch.tensor([[5, 6, 0]])
    target = torch.tensor([[5, 6, -100]])
    mask = torch.tensor([[True, True, False]])
    pmax = torch.tensor([[0.5, 0.5, math.nan]])
    assert M.exact_match_scores(pred, pmax, target, mask).item() == pytest.approx(0.5)
    assert M.exact_accuracy(pred, target, mask).tolist() == [1.0]


def test_exact_accuracy() -> None:
    pred = torch.tensor([[1, 2], [1, 3]])
    target = torch.tensor([[1, 2], [1, 2]])
    assert M.exact_accuracy(pred, target, torch.ones(2, 2, dtype=torch.bool)).tolist() == [1.0, 0.0]


def test_diversity_score() -> None:
    assert M.diversity_score("a b a c", max_length=4096) == pytest.approx(4096 / 3)
    assert M.diversity_score("", max_length=100) == 100.0
    assert M.diversity_score("hello 你好", max_length=4096) == 4096.0


def test_quality_score() -> None:
    unique_100 = " ".join(f"w{i}" for i in range(100))
    assert M.quality_score(unique_100) == pytest.approx(40.96)
    half_repeated = " ".join(f"w{i % 100}" for i in range(200))  # 200 words, 100 unique
    assert M.quality_score(half_repeated) == pytest.approx(1 / ((200 / 4096) * 0.25))  # 81.92
    assert M.quality_score("too short") == 4096.0
    assert M.quality_score(unique_100 + " 中") == 4096.0


def test_mc_correct() -> None:
    choice_logits = torch.tensor([[0.1, 2.0, 0.3, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert M.mc_correct(choice_logits, torch.tensor([1, 1, 3])).tolist() == [1.0, 0.0, 1.0]


def test_aggregate_mean_and_nan() -> None:
    assert M.aggregate("exact_match", torch.tensor([0.5, 1.5, 1.0])) == pytest.approx(1.0)
    assert M.aggregate("accuracy", [1.0, 0.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(M.aggregate("bigram_loss", [1.0, math.nan]))
    assert math.isnan(M.aggregate("diversity", []))
    with pytest.raises(InputError):
        M.aggregate("nope", [1.0])


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        M.bigram_loss_scores(LOGITS, TARGET[:, :2], MASK)
    with pytest.raises(ValueError):
        M.exact_accuracy(TARGET, TARGET, MASK.int())
