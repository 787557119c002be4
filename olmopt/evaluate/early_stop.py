"""Chunked evaluation of one candidate with paired sequential early stopping (torch-free driver).

The evaluator scores chunk after chunk (the same fixed random order for every candidate); after each
chunk but the last, :func:`olmopt.evaluate.sequential.decide` compares the items seen so far with the
reference's (the incumbent's) and may stop the candidate. A stopped candidate's metrics are those of
the items it was scored on (partial), with the reason in ``stopped``. See docs/early_stop.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from olmopt.evaluate.item_scores import ItemScores, count, metric_of_items, paired_looks
from olmopt.evaluate.sequential import Score, decide, look_level


@dataclass
class Scored:
    """What an evaluation returns: objective values, per-item values and, when stopped early, why."""

    metrics: dict[str, float]
    items: ItemScores = field(default_factory=dict)
    stopped: str | None = None

    @property
    def n_items(self) -> int:
        return count(self.items)


@dataclass(frozen=True)
class StopRule:
    """The stage's early-stopping rule: level, selection score and tolerance, and the objectives' facts."""

    alpha: float
    directions: Mapping[str, str]
    metric_of: Mapping[str, str]
    score: Score = "copeland"
    tolerance: float = 0.0


@dataclass
class ChunkResult:
    """One chunk's evaluation: values over its items (unused),
    per-item values, token counts, NaN objectives."""

    items: ItemScores
    tokens: dict[str, dict[int, int]]
    nonfinite: list[str]


def run_chunks(
    evaluate_chunk: Callable[[int], ChunkResult],
    looks: int,
    rule: StopRule,
    reference: ItemScores | None,
    known: Mapping[str, float] | None = None,
) -> Scored:
    """Score chunks ``0 .. looks-1`` and stop after chunk ``c < looks - 1`` when the rule says the candidate
    cannot win against ``reference`` (None: never stop). ``known``: candidate-minus-reference differences
    of objectives read off the Recipe. Metrics are computed over the items scored (NaN for an objective
    whose outputs were non-finite in any chunk)."""
    items: ItemScores = {}
    tokens: dict[str, dict[int, int]] = {}
    nonfinite: set[str] = set()
    stopped: str | None = None
    for chunk in range(looks):
        result = evaluate_chunk(chunk)
        for name, per in result.items.items():
            items.setdefault(name, {}).update(per)
        for name, per_tokens in result.tokens.items():
            tokens.setdefault(name, {}).update(per_tokens)
        nonfinite.update(result.nonfinite)
        if reference is None or chunk == looks - 1:
            continue
        level = look_level(rule.alpha, chunk + 1, chunk, looks - 1)  # equal chunks: alpha / (looks - 1) each
        diffs = paired_looks(
            items, reference, rule.directions, rule.metric_of, rule.tolerance, rule.score, known
        )
        verdict = decide(diffs, level, rule.score)
        if verdict.stop:
            stopped = f"stopped after chunk {chunk + 1} of {looks}: {verdict.reason}"
            break
    metrics = {
        name: math.nan
        if name in nonfinite
        else metric_of_items(rule.metric_of.get(name, ""), per, tokens.get(name))
        for name, per in items.items()
    }
    return Scored(metrics, items, stopped)
