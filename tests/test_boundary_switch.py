"""``decisions.boundary: {mode: joint, switch: significant}``: a joint winner on another boundary than the
incumbent's stands only when significantly better than the best candidate on the incumbent's boundary, on
the search and held-out items together (search/boundary_switch.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
from scipy import stats

from olmopt.cli import main
from olmopt.config import SelectionConfig
from olmopt.evaluate.item_scores import ItemScores, item_attrs
from olmopt.recipe import Recipe
from olmopt.search import trials as T
from olmopt.search.boundary_switch import switch_verdict
from olmopt.search.decide import DecideRules, decide
from olmopt.search.kind import Stage, StageSpace
from tests.test_study import run_twice, study_file, with_held_out

_MAX = {"a": "maximize", "b": "maximize"}
_SHARES = {"a": "token_accuracy", "b": "token_accuracy"}


def _items(values: list[float]) -> dict[int, float]:
    return dict(enumerate(values))


def test_the_verdict_pools_each_objectives_search_and_held_out_differences() -> None:
    """Objective a: rival minus winner is -1 on 20 of 60 pooled items (search 40, held-out 20), 0 elsewhere;
    b: no difference. Centre (-1/3 + 0) / 2, the score-test variance about 0 is 20 / 59 / 60 for a and 0
    for b, so the one-sided 97.5 % bound (t, 59 degrees of freedom) is (-1/3 + t * sqrt(20 / 3540)) / 2
    = -0.0915: the winner is significantly better, by a lead of 1/6. With 6 items the same pattern is not
    significant."""
    winner = {
        "search": {"a": _items([1.0, 1.0, 1.0, 0.0] * 10), "b": _items([1.0, 0.0] * 20)},
        "held_out": {"a": _items([1.0, 1.0] * 10), "b": _items([0.0, 1.0] * 10)},
    }
    rival = {
        "search": {"a": _items([1.0, 0.0, 1.0, 0.0] * 10), "b": _items([1.0, 0.0] * 20)},
        "held_out": {"a": _items([0.0, 1.0] * 10), "b": _items([0.0, 1.0] * 10)},
    }
    verdict = switch_verdict(winner, rival, _MAX, _SHARES, 0.95)
    bound = (-1 / 3 + float(stats.t.ppf(0.975, 59)) * math.sqrt(20 / 59 / 60)) / 2
    assert verdict.lead == pytest.approx(1 / 6) and verdict.bound == pytest.approx(bound)
    assert bound == pytest.approx(-0.0915, abs=1e-4) and verdict.significant and verdict.items == 120
    # the search split alone (40 items, 10 differences) is weaker evidence; a few items are none
    small = switch_verdict(
        {"search": {"a": _items([1.0, 1.0, 1.0, 0.0])}},
        {"search": {"a": _items([1.0, 0.0, 1.0, 0.0])}},
        {"a": "maximize"},
        _SHARES,
        0.95,
    )
    assert small.lead == pytest.approx(0.25) and not small.significant
    # an objective that cannot certify (a perplexity) keeps the rival
    ppl = switch_verdict(winner, rival, _MAX, {"a": "token_accuracy", "b": "perplexity"}, 0.95)
    assert ppl.bound == math.inf and not ppl.significant


def _trial(number: int, boundary: str, values: list[float]) -> optuna.trial.FrozenTrial:
    """A joint-stage trial on ``boundary`` with per-item search values ``values`` of objective acc."""
    recipe = Recipe(base="m/a", boundary=boundary, layers={0: f"m/{number}"}).to_json()
    attrs: dict[str, Any] = {T.RECIPE_ATTR: recipe, "feasible": True, **item_attrs({"acc": _items(values)})}
    trial = optuna.trial.create_trial(values=[sum(values) / len(values)], user_attrs=attrs)
    trial.number = number
    return trial


class _SameJson:
    """Model identity by Recipe JSON (no pool needed)."""

    def same_json(self, a: str, b: str) -> bool:
        return a == b

    def same(self, a: Recipe, b: Recipe) -> bool:
        return a.to_json() == b.to_json()


def _decide_switch(
    guarded: bool, n: int, confidence: float | None = None
) -> tuple[str, str, list[tuple[str, str]]]:
    """Incumbent on boundary m/a; t1 on m/b leads t2 (the best on m/a) by 0.25 on ``n`` search items and
    by 0.5 on ``n`` held-out items; the switch tested at ``confidence`` (None: the selection's 0.95)."""
    trials = {
        "incumbent": _trial(0, "m/a", [1.0, 0.0, 0.0, 0.0] * (n // 4)),
        "t1": _trial(1, "m/b", [1.0, 1.0, 1.0, 0.0] * (n // 4)),
        "t2": _trial(2, "m/a", [1.0, 1.0, 0.0, 0.0] * (n // 4)),
    }
    held = {"t1": [1.0, 1.0] * (n // 2), "t2": [1.0, 0.0] * (n // 2)}
    by_recipe = {t.user_attrs[T.RECIPE_ATTR]: label for label, t in trials.items()}
    calls: list[tuple[str, str]] = []

    def items_of(recipe: Recipe, split: str) -> ItemScores:
        label = by_recipe[recipe.to_json()]
        calls.append((label, split))
        return {"acc": _items(held[label])}

    rules = DecideRules(
        ["acc"], {"acc": "maximize"}, [], SelectionConfig(score="mean"), True, True,
        {"acc": "token_accuracy"}, {"acc": n},
    )  # fmt: skip
    space = StageSpace(
        decode=lambda _t: ("x", Recipe(base="m/a")),
        enqueue=[("incumbent", {})],
        significant_boundary_switch=guarded,
        switch_confidence=confidence,
    )
    keys: Any = _SameJson()
    incumbent = Recipe(base="m/a", boundary="m/a", layers={0: "m/0"})
    d = decide(
        Stage(1, "joint-layers", n_trials=3), trials, space, incumbent, rules,
        keys, None, lambda _r, _s: {"acc": 0.5}, "me", items_of=items_of,
    )  # fmt: skip
    return d.winner, d.reason, calls


def test_decide_keeps_the_incumbents_boundary_unless_the_switch_is_significant() -> None:
    winner, reason, calls = _decide_switch(guarded=True, n=4)  # 4 + 4 items: not significant
    assert winner == "t2" and "boundary switch to m/b not significant" in reason
    assert "'t1' leads 't2' (boundary m/a) by +0.3750 on the search and held-out items" in reason
    assert ("t1", "held_out") in calls and ("t2", "held_out") in calls
    assert not any(split == "search" for _, split in calls)  # search items come from the trials
    winner, reason, _ = _decide_switch(guarded=True, n=200)  # the same margins on 200 + 200: significant
    assert winner == "t1" and reason.endswith("significant") and "not significant" not in reason
    # 4 + 4 items at 80 %: the one-sided 90 % bound is -0.0475 (at 97.5 % +0.1723): a lower level switches
    winner, reason, _ = _decide_switch(guarded=True, n=4, confidence=0.8)
    assert winner == "t1" and reason.endswith("significant") and "not significant" not in reason
    winner, reason, calls = _decide_switch(guarded=False, n=4)  # switch: best
    assert winner == "t1" and "boundary switch" not in reason and calls == []


def test_switch_significant_needs_the_joint_boundary_slot(tmp_path: Path, tiny_zoo: Path, capsys) -> None:
    path = study_file(
        tmp_path, tiny_zoo, "bad", layers={"mode": "joint", "n_trials": 5},
        boundary={"mode": "greedy", "switch": "significant"},
    )  # fmt: skip
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "switch significant" in err[0] and "needs mode: joint" in err[0], err
    assert not (tmp_path / "s.db").exists()


def test_a_campaign_guards_its_boundary_switch_on_search_and_held_out_items(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """End to end on the tiny zoo (a held-out part on every objective): the joint stage's winner keeps the
    base winner's boundary, or its reason says that the switch was significant; the run is reproducible."""
    from olmopt.search.campaign import Campaign

    layers = {"mode": "joint", "n_trials": 10, "warm_start": True, "sampler": "random", "only": [3]}
    boundary = {"mode": "joint", "donors": "all", "switch": "significant"}
    path = study_file(tmp_path, tiny_zoo, "sw", layers=layers, boundary=boundary)
    path = with_held_out(path, base={"mode": "auto"})
    winners = []
    for url in run_twice(path, "sw", tmp_path):
        decisions = Campaign.load("sw", url).decisions()
        base, joint = decisions["000-base"], decisions["001-joint-layers"]
        own = base.recipe.boundary_donor
        switched = joint.recipe.boundary_donor != own
        assert switched == joint.reason.endswith(", significant"), joint.reason
        winners.append((joint.winner, joint.recipe.to_json(), joint.reason))
    assert winners[0] == winners[1]


def test_the_polish_boundary_stages_are_guarded_too() -> None:
    """With ``donors: all`` each polish sweep begins with a greedy boundary stage: its winner on another
    boundary must pass the same test (the rival is the incumbent); layer stages are not guarded."""
    from types import SimpleNamespace

    from olmopt.search.kinds.swap import swap_space

    for switch, guarded in (("significant", True), ("best", False)):
        boundary = SimpleNamespace(switch=switch)
        env: Any = SimpleNamespace(
            pool_names=["m/a", "m/b"], adapter=None,
            config=SimpleNamespace(decisions=SimpleNamespace(boundary=boundary)),
        )  # fmt: skip
        incumbent = Recipe(base="m/a")
        space = swap_space(Stage(2, "polish-boundary"), incumbent, env)
        assert space.significant_boundary_switch is guarded
        assert [label for label, _ in space.enqueue] == ["m/a", "m/b"]
        assert not swap_space(Stage(3, "polish-layer", "0"), incumbent, env).significant_boundary_switch
