"""A stage's decision, typed: what ``search.decide.decide`` returns and ``search.campaign`` stores and reads.

The stored form (``to_dict``, the stage study's user attr ``olmopt.decision``) is the one campaigns
have always had: the fields below as JSON keys, the Recipe as its JSON text, and the kind's own fields
(``StageSpace.details``, e.g. ``es_tune``) at the top level. ``from_dict`` reads every stored decision,
old ones included (keys it does not know are the kind's details). No Optuna, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from olmopt.recipe import Recipe

_CORE = (
    "stage", "winner", "trial", "kept_incumbent", "recipe", "metrics", "held_out", "reason", "decided_by",
    "candidates", "held_out_guard", "ties", "significance", "intervals", "runner_up", "incumbent_label",
    "items", "pruned",
)  # fmt: skip


@dataclass(frozen=True)
class CandidateResult:
    """One evaluated candidate of a stage: its search metrics,
    feasibility, trial and (some) held-out figures."""

    metrics: dict[str, float]
    feasible: bool
    trial: int | None
    held_out: dict[str, float] | None = None  # the held-out guard's candidates and a joint stage's baselines

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metrics": self.metrics, "feasible": self.feasible, "trial": self.trial}
        if self.held_out is not None:
            out["held_out"] = self.held_out
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateResult:
        return cls(
            dict(data["metrics"]), bool(data.get("feasible", True)), data.get("trial"), data.get("held_out")
        )


@dataclass(frozen=True)
class Decision:
    """The outcome of one stage: the winner (a candidate label, or "incumbent" when the incumbent stays
    without being evaluated in the stage), its trial, Recipe, metrics and held-out figures."""

    stage: str
    winner: str
    trial: int | None
    recipe: Recipe
    metrics: dict[str, float]
    held_out: dict[str, float] = field(default_factory=dict)
    candidates: dict[str, CandidateResult] = field(default_factory=dict)
    reason: str = ""
    decided_by: str | None = None
    kept_incumbent: bool = False
    held_out_guard: list[str] = field(default_factory=list)  # the candidates the guard compared, search order
    items: dict[str, str] = field(
        default_factory=dict
    )  # the winner's packed per-item values (evaluate.item_scores)
    pruned: dict[str, str] = field(default_factory=dict)  # candidates stopped early (PRUNED) -> why
    details: dict[str, Any] = field(default_factory=dict)  # the kind's own fields (``StageSpace.details``)
    ties: str = ""  # selection's tie rule (``confidence.selection_ties``); "" under a kind's own rule
    significance: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> objective -> vs winner
    # the runner-up's and the incumbent's: label -> objective -> {verdict, rule, interval of (label - winner)}
    intervals: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    runner_up: str = ""  # the best other candidate of the selection order ("" under a kind's rule, or alone)
    incumbent_label: str = ""  # the incumbent among the candidates ("" when it was not one)

    def to_dict(self) -> dict[str, Any]:
        """The stored (JSON) form."""
        out: dict[str, Any] = {
            "stage": self.stage,
            "winner": self.winner,
            "trial": self.trial,
            "kept_incumbent": self.kept_incumbent,
            "recipe": self.recipe.to_json(),
            "metrics": self.metrics,
            "held_out": self.held_out,
            "reason": self.reason,
            "decided_by": self.decided_by,
            "candidates": {label: c.to_dict() for label, c in self.candidates.items()},
        }
        if self.held_out_guard:
            out["held_out_guard"] = list(self.held_out_guard)
        if self.ties:
            out["ties"], out["significance"] = self.ties, self.significance
            out["intervals"] = self.intervals
            out["runner_up"], out["incumbent_label"] = self.runner_up, self.incumbent_label
        if self.items:
            out["items"] = dict(self.items)
        if self.pruned:
            out["pruned"] = dict(self.pruned)
        return out | self.details

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        """A stored decision (any olmopt version's)."""
        return cls(
            stage=str(data["stage"]),
            winner=str(data["winner"]),
            trial=data.get("trial"),
            recipe=Recipe.from_json(data["recipe"]),
            metrics=dict(data["metrics"]),
            held_out=dict(data.get("held_out") or {}),
            candidates={
                label: CandidateResult.from_dict(c) for label, c in (data.get("candidates") or {}).items()
            },
            reason=str(data.get("reason", "")),
            decided_by=data.get("decided_by"),
            kept_incumbent=bool(data.get("kept_incumbent", False)),
            held_out_guard=list(data.get("held_out_guard") or []),
            ties=str(data.get("ties", "")),
            significance=dict(data.get("significance") or {}),
            intervals=dict(data.get("intervals") or {}),
            runner_up=str(data.get("runner_up", "")),
            incumbent_label=str(data.get("incumbent_label", "")),
            items=dict(data.get("items") or {}),
            pruned=dict(data.get("pruned") or {}),
            details={k: v for k, v in data.items() if k not in _CORE},
        )

    def with_details(self, details: dict[str, Any]) -> Decision:
        """This decision with the kind's extra fields added."""
        from dataclasses import replace

        return replace(self, details={**self.details, **details})

    def candidate_metrics(self) -> dict[str, dict[str, float]]:
        """Objective name -> candidate label -> search value (OLM's per-dataset report sections)."""
        out: dict[str, dict[str, float]] = {}
        for label, cand in self.candidates.items():
            for name, value in cand.metrics.items():
                out.setdefault(name, {})[label] = value
        return out


def decision_of_kind(decisions: dict[str, Decision], kind: str) -> Decision | None:
    """The decision of the campaign's stage of ``kind`` that has no target (stage key ``NNN-KIND``, such as
    ``000-base``) among ``decisions`` (by stage key); None when that stage is not decided."""
    return next((d for key, d in decisions.items() if key.partition("-")[2] == kind), None)
