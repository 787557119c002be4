"""``decisions.boundary: {mode: joint, switch: significant}``: leaving the boundary takes evidence.

A joint stage with a boundary slot compares merges on different boundaries by their search means, and a
difference of 0.01-0.02 over a few hundred items is noise: on the AMD tiny qwen2 zoo a merge on the
base's boundary led the full specialist spec_add by 0.015 on the search split and trailed it by 0.05 on
the held-out split, while on the small mistral zoo the merge on the base's boundary that the zoo was built
from led spec_mc by a similar margin on the search split and by more on the held-out one. With
``switch: significant`` a winner on another boundary than the incumbent's stands only when it beats the
best candidate on the incumbent's boundary (the *rival*) on the search and held-out items together: the
one-sided upper confidence bound of the rival's paired difference (``sequential.mean_bound``, level
``(1 - selection.confidence) / 2``), each objective's search and held-out differences pooled, must be
below zero. Otherwise the rival wins the stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from olmopt.evaluate.item_scores import ItemScores, paired_looks
from olmopt.evaluate.sequential import Look, mean_bound


@dataclass(frozen=True)
class SwitchVerdict:
    """The pooled comparison of a stage winner on another boundary with the rival: ``lead`` (the winner's
    mean difference over objectives, items of both splits), ``bound`` (the one-sided upper confidence
    bound of the rival's difference; below 0: the winner is significantly better), ``items`` (paired
    item comparisons used)."""

    lead: float
    bound: float
    items: int

    @property
    def significant(self) -> bool:
        return self.bound < 0.0


def switch_verdict(
    winner: Mapping[str, ItemScores],
    rival: Mapping[str, ItemScores],
    directions: Mapping[str, str],
    metric_of: Mapping[str, str],
    confidence: float,
) -> SwitchVerdict:
    """``winner`` and ``rival``: split ("search", "held_out") -> objective -> item -> value. Per objective
    the paired differences (rival minus winner, oriented so that positive favours the rival) of every
    split both were scored on are pooled; an objective without comparable items (a perplexity, a
    non-finite value) makes the bound +inf, so the rival stays."""
    pooled: dict[str, list[float]] = {name: [] for name in directions}
    usable = dict.fromkeys(directions, True)
    for split in sorted(set(winner) & set(rival)):
        looks = paired_looks(rival[split], winner[split], directions, metric_of, score="mean")
        for name, look in looks.items():
            if look.shift is None and look.diffs:
                usable[name] = False
            pooled[name].extend(look.diffs)
    merged = {name: Look(d, 0.0 if usable[name] else None) for name, d in pooled.items()}
    means = [sum(d) / len(d) for d in pooled.values() if d]
    lead = -sum(means) / len(means) if means else 0.0
    bound = mean_bound(merged, (1.0 - confidence) / 2.0)
    return SwitchVerdict(lead, bound, sum(len(d) for d in pooled.values()))
