"""Per-item results of an evaluation: compact storage, metrics of a subset of items, paired differences.

An evaluation keeps, per objective, one value per scored item (item index -> value; perplexity: the
item's summed token cross-entropy). Stored on a trial as the user attr ``i.<objective>``: float32
values in item order (NaN where an item was not scored), zlib-compressed, base64. Torch-free.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from olmopt.evaluate.sequential import Look

ItemScores = dict[str, dict[int, float]]  # objective -> item index -> value
ITEMS_PREFIX = "i."  # trial user attr of an objective's packed per-item values
N_ITEMS_ATTR = "n_items"  # trial user attr: item evaluations spent (items scored, summed over objectives)


class _Trial(Protocol):
    @property
    def number(self) -> int: ...
    @property
    def user_attrs(self) -> dict[str, object]: ...


def pack(values: Mapping[int, float]) -> str:
    """``values`` (item index -> value) as compressed base64 float32, NaN for the missing indices."""
    size = max(values) + 1 if values else 0
    array = np.full(size, np.nan, dtype="<f4")
    for index, value in values.items():
        array[index] = value
    return base64.b64encode(zlib.compress(array.tobytes(), 9)).decode("ascii")


def unpack(text: str) -> dict[int, float]:
    """The inverse of :func:`pack` (float32 precision); NaN entries are the items not scored."""
    array = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<f4")
    return {i: float(v) for i, v in enumerate(array) if not math.isnan(float(v))}


def item_attrs(items: ItemScores) -> dict[str, str | int]:
    """The user attrs of an evaluation's per-item values: ``i.<objective>`` (packed) and ``n_items``."""
    attrs: dict[str, str | int] = {
        ITEMS_PREFIX + name: pack(per) for name, per in sorted(items.items()) if per
    }
    attrs[N_ITEMS_ATTR] = count(items)
    return attrs


def packed_items(user_attrs: Mapping[str, object]) -> dict[str, str]:
    """Objective -> packed per-item values, from a trial's user attrs (empty: none recorded)."""
    return {k.removeprefix(ITEMS_PREFIX): str(v) for k, v in user_attrs.items() if k.startswith(ITEMS_PREFIX)}


def unpack_all(packed: Mapping[str, str]) -> ItemScores:
    """Objective -> item index -> value from :func:`packed_items` (or a decision's ``items``)."""
    return {name: unpack(text) for name, text in packed.items()}


class TrialItems:
    """Per-item values of finished trials, unpacked once per trial number (a stage's trials: a finished
    trial's user attrs never change). Call with anything that has ``number`` and ``user_attrs``."""

    def __init__(self) -> None:
        self._unpacked: dict[int, ItemScores] = {}

    def __call__(self, trial: _Trial) -> ItemScores:
        if trial.number not in self._unpacked:
            self._unpacked[trial.number] = unpack_all(packed_items(trial.user_attrs))
        return self._unpacked[trial.number]


def count(items: ItemScores) -> int:
    """Item evaluations of a result: items scored, summed over objectives."""
    return sum(len(per) for per in items.values())


def metric_of_items(
    metric: str, values: Mapping[int, float], tokens: Mapping[int, int] | None = None
) -> float:
    """An objective's value over the scored items: their mean; perplexity ``exp(sum CE / sum tokens)``."""
    if not values:
        return math.nan
    if metric == "perplexity":
        n_tokens = sum((tokens or {}).get(i, 0) for i in values)
        mean = sum(values.values()) / n_tokens if n_tokens else math.nan
        return math.inf if mean > 709.0 else math.exp(mean)
    return float(sum(values.values()) / len(values))


def paired_looks(
    candidate: ItemScores,
    reference: ItemScores,
    directions: Mapping[str, str],
    metric_of: Mapping[str, str],
    tolerance: float = 0.0,
    score: str = "copeland",
    known: Mapping[str, float] | None = None,
) -> dict[str, Look]:
    """Per objective, candidate-minus-reference differences on the items both scored, oriented so that
    positive is better for the candidate (olmopt.evaluate.sequential). ``tolerance`` is in metric units,
    which are item units except for perplexity: a perplexity objective certifies nothing with a tolerance
    or under ``score: mean``, and neither does an objective with non-finite item values or without items.
    ``known``: objective -> (candidate - reference) of objectives known without items (read off the Recipe).
    Every objective of ``directions`` gets a look."""
    looks: dict[str, Look] = {}
    for name, value in (known or {}).items():
        sign = 1.0 if directions[name] == "maximize" else -1.0
        looks[name] = Look([], tolerance, known=sign * value) if math.isfinite(value) else Look([], None)
    for name in sorted(set(directions) - set(looks) - set(candidate)):
        looks[name] = Look([], None)
    for name in sorted(candidate):
        ref = reference.get(name, {})
        common = sorted(i for i in candidate[name] if i in ref)
        sign = 1.0 if directions[name] == "maximize" else -1.0
        diffs = [sign * (candidate[name][i] - ref[i]) for i in common]
        exact = metric_of.get(name) != "perplexity" or (tolerance == 0.0 and score != "mean")
        usable = exact and all(math.isfinite(d) for d in diffs)
        looks[name] = Look(diffs, tolerance if usable else None)
    return looks
