"""The typed Decision (stored form unchanged) and the pure ``decide`` with an injected scorer: no model."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import pytest

from olmopt.config import SelectionConfig
from olmopt.evaluate.item_scores import pack
from olmopt.recipe import Recipe
from olmopt.search import trials as T
from olmopt.search.decide import DecideRules, decide
from olmopt.search.decision import CandidateResult, Decision
from olmopt.search.identity import ModelKeys
from olmopt.search.kind import Stage, StageSpace

STORED = {  # a decision as every olmopt version stored it (user attr ``olmopt.decision``)
    "stage": "003-joint-layers",
    "winner": "t2",
    "trial": 2,
    "kept_incumbent": False,
    "recipe": Recipe(base="m/a", layers={1: "m/b"}).to_json(),
    "metrics": {"acc": 0.75},
    "held_out": {"acc": 0.5},
    "reason": "'t2': Copeland 1",
    "decided_by": "host:1",
    "candidates": {
        "t1": {"metrics": {"acc": 0.7}, "feasible": True, "trial": 1, "held_out": {"acc": 0.25}},
        "t2": {"metrics": {"acc": 0.75}, "feasible": False, "trial": 2},
    },
    "held_out_guard": ["t1", "t2"],
    "es_tune": {"sigma": 0.01, "generations": 2},  # a kind's own field (``StageSpace.details``)
}


def test_a_stored_decision_reads_typed_and_writes_back_unchanged() -> None:
    d = Decision.from_dict(STORED)
    assert d.recipe == Recipe(base="m/a", layers={1: "m/b"}) and d.trial == 2 and d.decided_by == "host:1"
    assert d.candidates["t1"] == CandidateResult({"acc": 0.7}, True, 1, {"acc": 0.25})
    assert d.candidates["t2"].held_out is None and not d.candidates["t2"].feasible
    assert d.details == {"es_tune": {"sigma": 0.01, "generations": 2}} and d.held_out_guard == ["t1", "t2"]
    assert d.to_dict() == STORED
    assert d.candidate_metrics() == {"acc": {"t1": 0.7, "t2": 0.75}}
    # an old decision without the later fields (decided_by, kept_incumbent, guard) still reads
    old = {
        k: v
        for k, v in STORED.items()
        if k not in ("decided_by", "kept_incumbent", "held_out_guard", "es_tune")
    }
    assert Decision.from_dict(old).decided_by is None and Decision.from_dict(old).details == {}


def _trial(number: int, acc: float) -> optuna.trial.FrozenTrial:
    recipe = Recipe(base="m/a", layers={0: f"m/{number}"}).to_json()
    trial = optuna.trial.create_trial(values=[acc], user_attrs={T.RECIPE_ATTR: recipe, "feasible": 1})
    trial.number = number
    return trial


def _decide(joint: bool, held: dict[str, float]) -> tuple[Decision, list[tuple[str, str]]]:
    trials = {"a": _trial(0, 0.9), "b": _trial(1, 0.8), "c": _trial(2, 0.5)}
    calls: list[tuple[str, str]] = []
    by_recipe = {t.user_attrs[T.RECIPE_ATTR]: label for label, t in trials.items()}

    def score(recipe: Recipe, split: str) -> dict[str, float]:
        label = by_recipe[recipe.to_json()]
        calls.append((label, split))
        return {"acc": held[label]}

    rules = DecideRules(["acc"], {"acc": "maximize"}, [], SelectionConfig(held_out_guard=2), joint, True)
    space = StageSpace(decode=lambda _t: ("x", Recipe(base="m/a")), enqueue=[("c", {})])
    keys: Any = ModelKeys(None, [])  # no incumbent, no earlier decision: never asked
    return decide(
        Stage(3, "joint-layers", n_trials=3), trials, space, None, rules, keys, None, score, "me"
    ), calls


def test_decide_runs_the_held_out_guard_through_the_injected_scorer() -> None:
    d, calls = _decide(joint=True, held={"a": 0.6, "b": 0.7, "c": 0.1})
    # search order a (0.9), b (0.8); the guard over the top 2 prefers b's held-out 0.7 over a's 0.6
    assert d.winner == "b" and d.trial == 1 and d.metrics == {"acc": 0.8} and d.held_out == {"acc": 0.7}
    assert "held-out guard: 'b'" in d.reason and d.held_out_guard == ["a", "b"] and d.decided_by == "me"
    assert calls == [("a", "held_out"), ("b", "held_out"), ("c", "held_out")]  # c: the enqueued baseline
    # the significance table compares with the final winner b (no item counts: by value); a runs up
    assert d.runner_up == "a" and d.significance == {"a": {"acc": "better"}, "c": {"acc": "worse"}}
    assert d.intervals == {"a": {"acc": {"verdict": "better", "rule": "equal", "interval": None}}}
    assert {lbl: c.held_out for lbl, c in d.candidates.items()} == {
        "a": {"acc": 0.6},
        "b": {"acc": 0.7},
        "c": {"acc": 0.1},
    }


def test_decide_without_a_joint_kind_checks_only_the_winner_on_held_out() -> None:
    d, calls = _decide(joint=False, held={"a": 0.6, "b": 0.7, "c": 0.1})
    assert d.winner == "a" and d.held_out == {"acc": 0.6} and calls == [("a", "held_out")]
    assert d.held_out_guard == [] and all(c.held_out is None for c in d.candidates.values())


def test_the_kinds_give_olms_report_sections_and_report_plots() -> None:
    from olmopt.export import olm_report_sections
    from olmopt.search.kinds import get_kind

    def decided(stage: Stage, winner: str) -> Decision:
        candidates = {
            "m/a": CandidateResult({"acc": 0.5}, True, 0),
            "m/b": CandidateResult({"acc": 0.7}, True, 1),
        }
        return Decision(stage.key, winner, 1, Recipe(base="m/a"), {"acc": 0.7}, candidates=candidates)

    unit = "model.layers.0.mlp.up_proj"
    stages = [
        (Stage(0, "base"), "m/a"),
        (Stage(1, "boundary"), "m/b"),
        (Stage(2, "layer", "1"), "m/b"),
        (Stage(3, "block", "2-3"), "m/b"),  # OLM has no section for blocks
        (Stage(4, "unit", unit), "m/b"),
        (Stage(5, "joint-layers", n_trials=3), "t7"),  # nor for joint stages
        (Stage(6, "layer", "1", sweep=2), "m/a"),  # a later sweep's decision replaces the earlier one
    ]
    report = olm_report_sections(get_kind(s.kind).olm_report(s, decided(s, w)) for s, w in stages)
    per_candidate = {"acc": {"m/a": 0.5, "m/b": 0.7}}
    assert report == {
        "base_model": {"name": "m/a", "metrics": {"acc": 0.7}},
        "boundary_layers": {"name": "m/b", "metrics": {"acc": 0.7}},
        "layers": {"1": {"metrics": per_candidate, "best_model": "m/a"}},
        "tensors": {f"{unit}.weight": {"metrics": per_candidate, "best_model": "m/b"}},
    }
    plots = {
        k: get_kind(k).report_plot for k in ("layer", "joint-layers", "joint-merge", "es-svd", "es-tune-norm")
    }
    assert plots == {
        "layer": None,
        "joint-layers": "pareto",
        "joint-merge": "pareto",
        "es-svd": "es",
        "es-tune-norm": "es",
    }


def test_decide_ties_by_confidence_and_records_which_differences_are_significant() -> None:
    from olmopt.confidence import difference_interval

    trials = {"a": _trial(0, 0.9), "b": _trial(1, 0.8), "c": _trial(2, 0.5)}
    # on 40 items 0.9 vs 0.8 is noise (the interval holds 0), 0.9 vs 0.5 is not
    assert difference_interval(0.9, 40, 0.8, 40)[0] < 0 < difference_interval(0.9, 40, 0.5, 40)[0]
    space = StageSpace(decode=lambda _t: ("x", Recipe(base="m/a")))
    keys: Any = ModelKeys(None, [])
    stage = Stage(1, "layer", target="0")
    rules = DecideRules(
        ["acc"], {"acc": "maximize"}, [], SelectionConfig(held_out_check=False), False, False,
        {"acc": "token_accuracy"}, {"acc": 40},
    )  # fmt: skip
    d = decide(stage, trials, space, None, rules, keys, None, lambda _r, _s: {}, "me")
    assert d.winner == "a" and d.ties == "ties by 95% confidence: Newcombe on acc (40 items); others by value"
    assert d.significance == {"b": {"acc": "tie"}, "c": {"acc": "worse"}}
    # the runner-up's interval and rule (no incumbent among the candidates)
    b_vs_a = difference_interval(0.8, 40, 0.9, 40)
    assert d.runner_up == "b" and d.incumbent_label == ""
    assert d.intervals == {"b": {"acc": {"verdict": "tie", "rule": "newcombe", "interval": list(b_vs_a)}}}
    assert Decision.from_dict(d.to_dict()) == d and d.to_dict()["intervals"] == d.intervals
    # an explicit tolerance replaces the rule: 0.9 beats 0.8
    by_value = SelectionConfig(tolerance=0.0, held_out_check=False)
    metric, items = {"acc": "token_accuracy"}, {"acc": 40}
    fixed = DecideRules(["acc"], {"acc": "maximize"}, [], by_value, False, False, metric, items)
    d = decide(stage, trials, space, None, fixed, keys, None, lambda _r, _s: {}, "me")
    assert d.ties == "fixed tolerance 0" and d.significance == {"b": {"acc": "worse"}, "c": {"acc": "worse"}}
    assert d.intervals == {"b": {"acc": {"verdict": "worse", "rule": "tolerance 0", "interval": None}}}
    # decisions of earlier versions have no intervals
    old = Decision.from_dict(STORED | {"ties": "fixed tolerance 0", "significance": {"t1": {"acc": "worse"}}})
    assert old.significance == {"t1": {"acc": "worse"}} and old.intervals == {} and old.runner_up == ""


def _loss_trial(number: int, per_item: list[float], reused: bool = False) -> optuna.trial.FrozenTrial:
    recipe = Recipe(base="m/a", layers={0: f"m/{number % 10}"}).to_json()
    attrs: dict[str, Any] = {T.RECIPE_ATTR: recipe, "feasible": 1}
    if not reused:
        attrs["i.loss"] = pack(dict(enumerate(per_item)))
    mean = float(np.mean(np.asarray(per_item, dtype=np.float32)))
    trial = optuna.trial.create_trial(values=[mean], user_attrs=attrs)
    trial.number = number
    return trial


def test_decide_ties_losses_by_the_paired_bootstrap_of_their_items() -> None:
    """a (keep's items plus noise of mean -0.002) ties keep; b is 0.3 worse on every item: worse. keep's
    metrics were reused (no items of its own): it borrows those of twin, an evaluation of the same model."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.5, 60)
    noise = rng.normal(0.0, 0.05, 60)
    per_item = {
        "keep": list(base),
        "a": list(base + noise - noise.mean() - 0.002),
        "b": list(base + 0.3),
        "twin": list(base),
    }
    numbers = {"keep": 0, "a": 1, "b": 2, "twin": 10}  # twin: m/0 again, keep's model
    trials = {k: _loss_trial(numbers[k], v, reused=k == "keep") for k, v in per_item.items()}
    assert trials["a"].values[0] < trials["keep"].values[0]  # a is better by value
    space = StageSpace(decode=lambda _t: ("x", Recipe(base="m/a")), enqueue=[("keep", {})])
    stage = Stage(1, "layer", target="0")
    keys: Any = _SameJson()
    rules = DecideRules(
        ["loss"], {"loss": "minimize"}, [], SelectionConfig(held_out_check=False), False, False,
        {"loss": "bigram_loss"}, {"loss": 60},
    )  # fmt: skip
    d = decide(stage, trials, space, Recipe(base="m/a", layers={0: "m/0"}), rules, keys, None, _none, "me")
    assert d.winner == "keep" and d.kept_incumbent and d.incumbent_label == "keep"  # a only ties it
    assert d.ties == "ties by 95% confidence: paired bootstrap (2000 resamples) on loss; others by value"
    assert d.significance == {"a": {"loss": "tie"}, "b": {"loss": "worse"}, "twin": {"loss": "tie"}}
    a = d.intervals["a"]["loss"]
    assert d.runner_up == "a" and set(d.intervals) == {"a"}
    assert a["verdict"] == "tie" and a["rule"] == "bootstrap" and a["interval"][0] < 0 < a["interval"][1]
    # without a and with b's model as the incumbent, b's interval against keep (its items borrowed from
    # twin) is recorded: every resample differs by exactly 0.3
    no_a = {k: t for k, t in trials.items() if k != "a"}
    d = decide(stage, no_a, space, Recipe(base="m/a", layers={0: "m/2"}), rules, keys, None, _none, "me")
    assert d.winner == "keep" and d.incumbent_label == "b"
    b = d.intervals["b"]["loss"]
    assert b["verdict"] == "worse" and b["rule"] == "bootstrap"
    assert b["interval"] == pytest.approx([0.3, 0.3], abs=1e-5)
    # without per-item values the loss ties only when equal: a (better by value) wins
    bare = {k: _loss_trial(numbers[k], v, reused=True) for k, v in per_item.items()}
    d = decide(stage, bare, space, Recipe(base="m/a", layers={0: "m/0"}), rules, keys, None, _none, "me")
    assert d.winner == "a" and d.significance["keep"]["loss"] == "worse"
    assert d.intervals["keep"]["loss"] == {"verdict": "worse", "rule": "equal", "interval": None}


def _none(_r: Recipe, _s: str) -> dict[str, float]:
    return {}


class _SameJson:
    """Model identity by Recipe JSON (no pool needed)."""

    def same_json(self, a: str, b: str) -> bool:
        return a == b

    def same(self, a: Recipe, b: Recipe) -> bool:
        return a.to_json() == b.to_json()
