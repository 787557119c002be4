"""Near-ties before a racing stage decides (olmopt.search.near_ties), on hand-made trials."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from olmopt.evaluate.early_stop import StopRule
from olmopt.evaluate.item_scores import pack
from olmopt.search.near_ties import RACED_ATTR, RESUME_ATTR, NearTies, resume_label, resumes

NAMES = ["add", "rev"]
RULE = StopRule(0.05, {"add": "maximize", "rev": "maximize"}, {n: "token_accuracy" for n in NAMES}, "mean")


def _trial(number: int, state: TrialState, add: list[float], rev: list[float], **attrs: Any) -> FrozenTrial:
    """A trial scored on the first ``len(add)`` items: per-item 0/1 values and the metrics they give."""
    user: dict[str, Any] = {"candidate": f"#{number}", "i.add": pack(dict(enumerate(add)))}
    user["i.rev"] = pack(dict(enumerate(rev)))
    user.update({"m.add": sum(add) / len(add), "m.rev": sum(rev) / len(rev), **attrs})
    values = [user["m.add"], user["m.rev"]] if state == TrialState.COMPLETE else None
    trial = optuna.trial.create_trial(
        state=state, values=values, params={"layer_0": "spec"},
        distributions={"layer_0": CategoricalDistribution(["base", "spec"])}, user_attrs=user,
    )  # fmt: skip
    trial.number = number
    return trial


def test_only_race_stopped_near_ties_without_a_finished_resume_are_due() -> None:
    ones, zeros = [1.0] * 40, [0.0] * 40
    leader = _trial(0, TrialState.COMPLETE, ones * 5, ones * 5)  # 200 items, every one right
    worse = _trial(1, TrialState.COMPLETE, ones * 4 + zeros, ones * 5)  # complete: competes as it is
    near = _trial(2, TrialState.PRUNED, ones, ones, **{RACED_ATTR: True, "pruned": "racing"})
    far = _trial(3, TrialState.PRUNED, zeros, zeros, **{RACED_ATTR: True, "pruned": "racing"})
    stopped = _trial(4, TrialState.PRUNED, ones, ones, pruned="dominated")  # the sequential test: final
    done = _trial(5, TrialState.PRUNED, ones, ones, **{RACED_ATTR: True, "pruned": "racing"})
    resume = _trial(6, TrialState.COMPLETE, ones * 5, ones * 4 + zeros, **{RESUME_ATTR: 5})
    trials = [leader, worse, near, far, stopped, done, resume]
    rule = NearTies(RULE, NAMES, 0.05)
    assert rule.leader(trials) is leader  # the best objective mean among COMPLETE trials
    # identical items: not worse; 40 of 40 items worse on both objectives: the bound is far below 0
    assert rule.near(near, leader) and not rule.near(far, leader)
    assert rule.due(trials) == [near]
    # a waiting or running resume is not finished: still due (the stage is not complete)
    waiting = _trial(7, TrialState.COMPLETE, ones, ones, **{RESUME_ATTR: 2})
    waiting.state, waiting.values = TrialState.RUNNING, None
    assert rule.due([*trials, waiting]) == [near]
    # a resume given up after repeated failures counts as finished
    waiting.user_attrs["candidate"] = resume_label(near.user_attrs, near.number)
    assert rule.due([*trials, waiting], exhausted={waiting.user_attrs["candidate"]}) == []
    assert resumes([near]) == [("#2 (resumed from trial 2)", {"layer_0": "spec"}, {RESUME_ATTR: 2})]
    # level 0 certifies nothing: every race-stopped trial without a finished resume is due
    assert NearTies(RULE, NAMES, 0.0).due(trials) == [near, far]
    # no complete trial: no leader, nothing due
    assert rule.due([near, far]) == []


def test_the_near_tie_test_is_one_look_of_the_sequential_rule() -> None:
    """A candidate 4 items worse in 40 on one objective and equal on the other: the objective-mean rule's
    upper bound (score test, Student t with 39 degrees of freedom) is below 0 at level 0.05 (not near)
    and above 0 at level 0.01 (near)."""
    ones = [1.0] * 40
    leader = _trial(0, TrialState.COMPLETE, ones * 5, ones * 5)
    cand = _trial(1, TrialState.PRUNED, [0.0] * 4 + [1.0] * 36, ones, **{RACED_ATTR: True})
    # mean difference -0.1 on add over 40 items, 0 on rev: combined mean -0.05; variance taken about 0:
    # (4 / 40) / 40 / 2^2 = 6.25e-4, sd 0.025. Level 0.05: t(0.95, 39) = 1.685, bound -0.05 + 0.0421 =
    # -0.0079 < 0, significantly worse; level 0.01: t(0.99, 39) = 2.426, bound +0.0107, a near-tie
    assert not NearTies(RULE, NAMES, 0.05).near(cand, leader)
    assert NearTies(RULE, NAMES, 0.01).near(cand, leader)
