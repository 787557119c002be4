"""Evaluation metrics: per-sample scores as tensors in, tensors out, plus a registry of directions.

Shapes: ``B`` samples, ``R`` padded answer positions, ``V`` vocabulary, ``K`` choices. ``mask[B, R]``
marks the real answer positions. Logits are the ones that PREDICT each answer token (already shifted):
``logits[b, r]`` scores ``target[b, r]``. A token counts as right when the greedy pick
(``argmax``, first index on ties) equals the label. Definitions and divergences from the OLM seed are in
docs/metrics.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from olmopt.errors import InputError

Direction = Literal["minimize", "maximize"]
Kind = Literal["teacher_forced", "generate", "choice", "recipe"]

CJK_FIRST, CJK_LAST = 0x4E00, 0x9FFF
QUALITY_MIN_WORDS = 100


@dataclass(frozen=True)
class MetricSpec:
    """What a metric measures, which way is better, and what the engine must run to get it."""

    name: str
    direction: Direction
    kind: Kind
    description: str


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "exact_match",
            "minimize",
            "generate",
            "OLM exact match: greedy rollout; all right -> mean(1 - p_max) in [0, 1); "
            "first mismatch at k of n -> 1 + (n - k - 1 + p_max[k]) / n in (1, 2].",
        ),
        MetricSpec(
            "accuracy",
            "maximize",
            "generate",
            "Fraction of samples whose greedy answer equals the reference exactly.",
        ),
        MetricSpec(
            "token_accuracy",
            "maximize",
            "teacher_forced",
            "Fraction of samples whose argmax is right at every answer position under teacher forcing "
            "(equals greedy accuracy; one forward pass, prefix-cache friendly).",
        ),
        MetricSpec(
            "bigram_loss",
            "minimize",
            "teacher_forced",
            "OLM bigram loss: per token 1 if wrong else 1 - p_max; mean of adjacent pair sums, in [0, 2].",
        ),
        MetricSpec(
            "perplexity",
            "minimize",
            "teacher_forced",
            "exp(mean token cross-entropy) over every answer token of the dataset.",
        ),
        MetricSpec(
            "diversity",
            "minimize",
            "generate",
            "OLM diversity: max_length / #unique words of the greedy reply; CJK output -> max_length.",
        ),
        MetricSpec(
            "quality",
            "minimize",
            "generate",
            "Older OLM quality: 1 / (length_share * unique_ratio^2); CJK or < 100 words -> max_length.",
        ),
        MetricSpec(
            "mc_accuracy",
            "maximize",
            "choice",
            "Fraction of multiple-choice questions whose highest-scoring choice is the answer.",
        ),
        MetricSpec(
            "layers_removed",
            "maximize",
            "recipe",
            "Decoder layers the merged model has fewer than the base (depth fusion, data-flow paths); "
            "read off the Recipe, no data needed.",
        ),
    )
}

METRIC_ALIASES: dict[str, str] = {"bigram": "bigram_loss", "exact": "exact_match"}


def get_metric(name: str) -> MetricSpec:
    """The spec of metric ``name``; raises InputError for an unknown name."""
    spec = METRICS.get(name)
    if spec is None:
        raise InputError(f"unknown metric {name!r} (choose from {', '.join(sorted(METRICS))})")
    return spec


# --------------------------------------------------------------------------- teacher-forced statistics


@dataclass(frozen=True, eq=False)
class TokenStats:
    """Per-position statistics of teacher-forced logits, all ``[B, R]`` (float32 / bool)."""

    label_logprob: Tensor
    max_prob: Tensor
    right: Tensor


def token_stats(logits: Tensor, target: Tensor, mask: Tensor) -> TokenStats:
    """One pass over ``logits[B, R, V]``: label log-prob, max prob and greedy-right flag per position.

    Uses one logsumexp and gathers instead of a full log_softmax; upcasts to float32 only when the
    logits are in a lower precision. Padding positions (``mask`` False) may hold any target id.
    """
    _check_shapes(logits.shape[:2], target, mask)
    lf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    best = lf.argmax(dim=-1)
    safe_target = torch.where(mask, target, torch.zeros_like(target))
    label_logit = lf.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    max_logit = lf.gather(-1, best.unsqueeze(-1)).squeeze(-1)
    return TokenStats(
        label_logprob=(label_logit - lse).float(),
        max_prob=torch.exp(max_logit - lse).float(),
        right=best == target,
    )


def bigram_loss_from_stats(stats: TokenStats, mask: Tensor) -> Tensor:
    """``[B]`` OLM bigram loss from precomputed statistics (see :func:`bigram_loss_scores`)."""
    per_token = torch.where(stats.right, 1.0 - stats.max_prob, torch.ones_like(stats.max_prob))
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    pair_mask = mask[:, :-1] & mask[:, 1:]
    pair_sum = torch.where(
        pair_mask, per_token[:, :-1] + per_token[:, 1:], torch.zeros_like(pair_mask, dtype=per_token.dtype)
    )
    n_pairs = pair_mask.sum(dim=1)
    paired = pair_sum.sum(dim=1) / n_pairs.clamp(min=1)
    single = 2.0 * per_token.sum(dim=1)  # one answer token: it sits in both windows
    return torch.where(n_pairs > 0, paired, single)


def bigram_loss_scores(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` OLM bigram loss in [0, 2] (lower is better).

    Per answer token ``s = 1`` if the greedy pick is wrong else ``1 - p_max``. The seed scores two
    overlapping windows (tokens ``0..n-2`` and ``1..n-1``) and takes the mean of their elementwise sum,
    i.e. ``mean_j (s_j + s_{j+1})`` over adjacent pairs. A one-token answer scores ``2 * s_0``; an empty
    row scores 0.
    """
    return bigram_loss_from_stats(token_stats(logits, target, mask), mask)


def cross_entropy_from_stats(stats: TokenStats, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``([B] summed token cross-entropy, [B] token counts)`` from precomputed statistics."""
    ce = torch.where(mask, -stats.label_logprob, torch.zeros_like(stats.label_logprob))
    return ce.sum(dim=1), mask.sum(dim=1)


def cross_entropy_sums(logits: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``([B] sum of token cross-entropies (nats), [B] token counts)`` over the answer positions."""
    return cross_entropy_from_stats(token_stats(logits, target, mask), mask)


def perplexity_from_sums(sum_ce: float, n_tokens: int) -> float:
    """Dataset perplexity ``exp(sum_ce / n_tokens)``; NaN for no tokens, inf on overflow."""
    if n_tokens <= 0 or math.isnan(sum_ce):
        return math.nan
    mean = sum_ce / n_tokens
    return math.inf if mean > 709.0 else math.exp(mean)


def token_accuracy_from_stats(stats: TokenStats, mask: Tensor) -> Tensor:
    """``[B]`` 1.0 where the greedy pick is right at every answer position, else 0.0."""
    return (stats.right | ~mask).all(dim=1).float()


def token_accuracy_scores(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` teacher-forced all-positions-right flags; equals greedy exact accuracy (argmax ties: first)."""
    return token_accuracy_from_stats(token_stats(logits, target, mask), mask)


# --------------------------------------------------------------------------- generation metrics


def exact_match_scores(
    pred_ids: Tensor, pmax: Tensor, target: Tensor, mask: Tensor, stop_at_first_mismatch: bool = True
) -> Tensor:
    """``[B]`` OLM exact-match loss of a greedy rollout (lower is better).

    ``pred_ids[b, r]`` is the greedy token at answer position r and ``pmax[b, r]`` its probability.

    * ``stop_at_first_mismatch=True`` (default): a fully right answer scores ``mean(1 - p_max)`` in
      [0, 1). A first mismatch at answer position k (of n) scores ``1 + (n - k - 1 + p_max[k]) / n`` in
      (1, 2]: the right prefix costs 0, the wrong token costs its confidence, and every position after it
      (the rollout stopped there) costs 1. ``pred_ids``/``pmax`` after the mismatch are ignored. So any
      right answer beats any wrong one, a longer right prefix beats a shorter one, and an uncertain
      mistake beats a certain one.
    * ``False`` (the OLM HEAD): the mean over positions of ``1 - p_max`` (right) or ``1 + p_max``
      (wrong), comparing every position of the drifted rollout.

    Rows without answer positions score 0.
    """
    _check_shapes(pred_ids.shape, target, mask)
    p = pmax.float()
    zeros = torch.zeros_like(p)
    n = mask.sum(dim=1).clamp(min=1)
    match = pred_ids == target
    if not stop_at_first_mismatch:
        per = torch.where(match, 1.0 - p, 1.0 + p)
        return torch.where(mask, per, zeros).sum(dim=1) / n
    mismatch = ~match & mask
    wrong = mismatch.any(dim=1)
    first = mismatch.to(torch.uint8).argmax(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    after = (mask & (positions.unsqueeze(0) > first.unsqueeze(1))).sum(dim=1)
    p_first = p.gather(1, first.unsqueeze(1)).squeeze(1)
    right_score = torch.where(mask, 1.0 - p, zeros).sum(dim=1) / n
    wrong_score = 1.0 + (after + p_first) / n
    return torch.where(wrong, wrong_score, right_score)


def exact_accuracy(pred_ids: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """``[B]`` 1.0 where the greedy answer equals the reference at every answer position, else 0.0."""
    _check_shapes(pred_ids.shape, target, mask)
    return ((pred_ids == target) | ~mask).all(dim=1).float()


def _has_cjk(text: str) -> bool:
    return any(CJK_FIRST <= ord(ch) <= CJK_LAST for ch in text)


def diversity_score(text: str, max_length: int = 4096) -> float:
    """OLM diversity (lower is better): ``max_length / max(#unique words, 1)``; CJK -> ``max_length``."""
    if _has_cjk(text):
        return float(max_length)
    return max_length / max(len(set(text.split())), 1)


def quality_score(text: str, max_length: int = 4096) -> float:
    """Older OLM quality (lower is better, best 1.0).

    CJK text or fewer than 100 words -> ``max_length``; else
    ``1 / (min(n_words, max_length) / max_length * (n_unique / n_words) ** 2)``.
    """
    words = text.split()
    if _has_cjk(text) or len(words) < QUALITY_MIN_WORDS:
        return float(max_length)
    length_share = min(len(words), max_length) / max_length
    repetition = len(set(words)) / len(words)
    return 1.0 / (length_share * repetition**2)


def mc_correct(choice_logits: Tensor, answer: Tensor) -> Tensor:
    """``[B]`` 1.0 where the highest choice score (first on ties) is the answer index, else 0.0."""
    if choice_logits.dim() != 2 or answer.shape != choice_logits.shape[:1]:
        raise ValueError(
            f"mc_correct: choice_logits {tuple(choice_logits.shape)} vs answer {tuple(answer.shape)}"
        )
    return (choice_logits.argmax(dim=1) == answer).float()


# --------------------------------------------------------------------------- dataset level


def aggregate(
    name: str, per_sample_values: Tensor | Sequence[float], token_counts: Tensor | Sequence[int] | None = None
) -> float:
    """Dataset-level value of metric ``name`` from its per-sample values.

    Every metric is the mean of its per-sample values (NaN when there are none; a NaN sample makes the
    whole value NaN, which selection ranks worst). ``perplexity`` is the exception: pass the per-sample
    cross-entropy sums as values and the per-sample token counts as ``token_counts``.
    """
    get_metric(name)
    values = torch.as_tensor(per_sample_values, dtype=torch.float64).reshape(-1)
    if name == "perplexity":
        if token_counts is None:
            raise ValueError("aggregate('perplexity', ...) needs token_counts (see cross_entropy_sums)")
        counts = torch.as_tensor(token_counts, dtype=torch.float64).reshape(-1)
        return perplexity_from_sums(float(values.sum()), int(counts.sum()))
    if values.numel() == 0:
        return math.nan
    return float(values.mean())


def _check_shapes(shape: torch.Size | tuple[int, ...], target: Tensor, mask: Tensor) -> None:
    if (
        tuple(shape) != tuple(target.shape)
        or tuple(target.shape) != tuple(mask.shape)
        or mask.dtype != torch.bool
    ):
        raise ValueError(
            f"expected [B, R] tensors of one shape and a bool mask; got {tuple(shape)}, "
            f"target {tuple(target.shape)}, mask {tuple(mask.shape)} {mask.dtype}"
        )
