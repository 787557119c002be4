"""Chunked evaluation of one candidate with paired sequential early stopping and racing (torch-free).

The evaluator scores chunk after chunk (the same fixed random order for every candidate); after each
chunk but the last, :func:`olmopt.evaluate.sequential.decide` compares the items seen so far with the
reference's (the stage's leader or the incumbent) and may stop the candidate; at the rungs of a
:class:`Race` (successive halving over item budgets) the candidate is stopped unless its partial score
is among the top ``1 / eta`` of the stage's candidates that reached that rung. A stopped candidate's
metrics are those of the items it was scored on (partial), with the reason in ``stopped``. Chunks whose
items are already known (the evaluation cache, a raced candidate resumed) are read, not evaluated, and
the same rule runs over them, so a re-run stops where the first run stopped. Values are rounded to
float32, as stored, so that a replay from storage decides exactly as the evaluation did. See
docs/early_stop.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from olmopt.evaluate.item_scores import ItemScores, count, metric_of_items, paired_looks
from olmopt.evaluate.sequential import Boundary, Score, ahead_on, decide, nominal_levels
from olmopt.select import select


@dataclass
class Scored:
    """What an evaluation returns: objective values, per-item values and, when stopped early, why."""

    metrics: dict[str, float]
    items: ItemScores = field(default_factory=dict)
    stopped: str | None = None
    raced: bool = False  # stopped by a race's rung (not by the sequential test)
    known_items: int = 0  # item values read from earlier results, not evaluated now

    @property
    def n_items(self) -> int:
        """Item evaluations spent on this result (items scored now, summed over objectives)."""
        return count(self.items) - self.known_items


@dataclass(frozen=True)
class StopRule:
    """The stage's early-stopping rule: level, selection score and tolerance, and the objectives' facts."""

    alpha: float
    directions: Mapping[str, str]
    metric_of: Mapping[str, str]
    score: Score = "copeland"
    tolerance: float = 0.0
    boundary: Boundary = "pocock"
    spare_front: bool = False  # score mean: a candidate ahead of its reference on some objective goes on
    spare_level: float = 1.0  # below 1: a lead counts only when the test that it is a lead passes at it


@dataclass(frozen=True)
class Race:
    """Successive halving among a stage's candidates over item budgets (rungs after ``first``,
    ``first * eta``, ... chunks, before the last): a candidate goes on past a rung when its partial score
    (the stage's selection score of its values over the rung's items) is among the top
    ``max(1, n // eta)`` of the ``n`` candidates that reached the rung, itself included; with fewer
    than ``eta`` there it goes on. ``peers``: per-item values of the stage's trials so far."""

    eta: int
    first: int
    peers: Sequence[ItemScores]

    def rungs(self, looks: int) -> list[int]:
        """Chunk counts after which the race looks (each below ``looks``)."""
        out, r = [], self.first
        while r < looks:
            out.append(r)
            r *= self.eta
        return out

    def verdict(self, items: ItemScores, rule: StopRule) -> str | None:
        """Why the candidate with ``items`` (a rung's) stops at this rung; None: it goes on."""
        scores: dict[str, dict[str, float]] = {name: {} for name in items}  # objectives with items
        entrants = {"candidate": items}
        for i, peer in enumerate(self.peers):
            if all(set(per) <= set(peer.get(name, {})) for name, per in items.items()):
                entrants[f"peer {i:05d}"] = {
                    name: {j: peer[name][j] for j in per} for name, per in items.items()
                }
        if len(entrants) < self.eta:
            return None
        for label, values in entrants.items():
            for name in scores:  # the mean of per-item values (perplexity: the mean summed cross-entropy)
                per = values.get(name)
                scores[name][label] = metric_of_items("", per) if per else math.nan
        directions = {name: rule.directions[name] for name in scores}
        order = select(scores, directions, score=rule.score).order
        rank, keep = order.index("candidate") + 1, max(1, len(order) // self.eta)
        if rank <= keep:
            return None
        return (
            f"racing: rank {rank} of the {len(order)} candidates after {count(items)} item evaluations "
            f"(the top {keep} go on)"
        )


@dataclass(frozen=True)
class StopInputs:
    """What a candidate's evaluation is stopped against: the reference's per-item values (None: no
    sequential test), its name in the reason and its objective values (those read off the Recipe
    compare exactly); the race's peers (None: no race). Picklable."""

    reference: ItemScores | None = None
    against: str = "the incumbent"
    metrics: Mapping[str, float] = field(default_factory=dict)
    peers: Sequence[ItemScores] | None = None
    known: ItemScores | None = None  # the candidate's own values already known: chunks they cover are read


@dataclass
class ChunkResult:
    """One chunk's evaluation: per-item values, token counts, NaN objectives; ``known``: read from
    earlier results (:func:`known_chunk`), not evaluated."""

    items: ItemScores
    tokens: dict[str, dict[int, int]]
    nonfinite: list[str]
    known: bool = False


def known_chunk(
    known: ItemScores, wanted: Mapping[str, Sequence[int]], tokens: Mapping[str, Mapping[int, int]]
) -> ChunkResult | None:
    """The chunk whose items are ``wanted`` (objective -> item indices) read from ``known`` values, when
    they hold every one of them (None: it must be evaluated). ``tokens``: perplexity objectives' token
    counts per item (a property of the data, not of the model)."""
    if not wanted or any(not set(idx) <= known.get(name, {}).keys() for name, idx in wanted.items()):
        return None
    items = {name: {i: known[name][i] for i in idx} for name, idx in wanted.items()}
    counts = {name: {i: tokens[name][i] for i in idx} for name, idx in wanted.items() if name in tokens}
    return ChunkResult(items, counts, [], known=True)


def as_stored(items: ItemScores) -> ItemScores:
    """``items`` rounded to float32, the precision in which trials and the cache keep them."""
    return {
        name: dict(zip(per, np.asarray(list(per.values()), dtype="<f4").tolist(), strict=True))
        for name, per in items.items()
    }


def run_chunks(
    evaluate_chunk: Callable[[int], ChunkResult],
    looks: int,
    rule: StopRule,
    reference: ItemScores | None,
    known: Mapping[str, float] | None = None,
    race: Race | None = None,
    against: str = "the reference",
) -> Scored:
    """Score chunks ``0 .. looks-1`` and stop after chunk ``c < looks - 1`` when the rule says the candidate
    cannot win against ``reference`` (``against`` names it; None: no such test) or when it loses a rung of
    ``race``. ``known``: candidate-minus-reference differences of objectives read off the Recipe. With
    the rule's ``spare_front`` (score mean) a candidate that the mean rule would stop goes on while it is
    ahead of the reference on some objective (``sequential.ahead_on`` at the rule's ``spare_level``).
    Metrics are computed over the items scored (NaN for an objective whose outputs were non-finite in
    any chunk)."""
    items: ItemScores = {}
    tokens: dict[str, dict[int, int]] = {}
    nonfinite: set[str] = set()
    stopped: str | None = None
    raced = False
    known_items = 0
    levels = nominal_levels(rule.alpha, looks - 1, rule.boundary)
    rungs = race.rungs(looks) if race is not None else []
    for chunk in range(looks):
        result = evaluate_chunk(chunk)
        if result.known:
            known_items += count(result.items)
        for name, per in as_stored(result.items).items():
            items.setdefault(name, {}).update(per)
        for name, per_tokens in result.tokens.items():
            tokens.setdefault(name, {}).update(per_tokens)
        nonfinite.update(result.nonfinite)
        if chunk == looks - 1:
            continue
        if reference is not None:
            diffs = paired_looks(
                items, reference, rule.directions, rule.metric_of, rule.tolerance, rule.score, known
            )
            verdict = decide(diffs, levels[chunk], rule.score, against)
            if verdict.stop and not (
                rule.spare_front and rule.score == "mean" and ahead_on(diffs, rule.spare_level)
            ):
                stopped = f"stopped after chunk {chunk + 1} of {looks}: {verdict.reason}"
                break
        if race is not None and chunk + 1 in rungs:
            lost = race.verdict(items, rule)
            if lost is not None:
                stopped, raced = f"stopped after chunk {chunk + 1} of {looks}: {lost}", True
                break
    metrics = {
        name: math.nan
        if name in nonfinite
        else metric_of_items(rule.metric_of.get(name, ""), per, tokens.get(name))
        for name, per in items.items()
    }
    return Scored(metrics, items, stopped, raced, known_items)
