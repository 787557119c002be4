"""Per-item results and chunked evaluation on real (small random) models; early stopping in a campaign."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from olmopt.cli import main
from olmopt.evaluate.early_stop import StopRule
from olmopt.evaluate.engine import Evaluator, Objective
from olmopt.evaluate.item_scores import metric_of_items, paired_looks, unpack
from olmopt.evaluate.sequential import ahead_on
from olmopt.recipe import Recipe
from olmopt.search.annotate import stage_note
from olmopt.search.campaign import Campaign
from olmopt.search.kind_registry import get_kind
from olmopt.search.near_ties import RESUME_ATTR, NearTies
from olmopt.search.trials import costs_budget

sys.path.insert(0, str(Path(__file__).parent))
from _models import char_tokenizer, make_family, write_addition_data  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("early_stop_family")
    close = make_family(root / "close", ["a", "b"], layers=2, noise=0.05)
    far = make_family(root / "far", ["a2", "x", "c"], layers=2, noise=3.0)  # the same base, c heavily damaged
    return {
        "a": close["a"],
        "b": close["b"],
        "c": far["c"],
        "data": write_addition_data(root / "add.json", n=120),
    }


def _objectives(data: Path) -> list[Objective]:
    return [
        Objective("ppl", data, "perplexity", held_out=0.0),
        Objective("acc", data, "token_accuracy", held_out=0.0),
        Objective("bigram", data, "bigram_loss", held_out=0.0),
    ]


def test_item_values_give_the_objective_values(family: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(family["b"])
    ev = Evaluator(model, char_tokenizer(), _objectives(family["data"]), batch_size=16)
    values = ev.evaluate()
    assert {n: len(v) for n, v in ev.item_scores.items()} == {"ppl": 120, "acc": 120, "bigram": 120}
    assert set(ev.item_scores["acc"].values()) <= {0.0, 1.0}
    for name in ("acc", "bigram"):
        assert metric_of_items("", ev.item_scores[name]) == pytest.approx(values[name], rel=1e-5)
    assert metric_of_items("perplexity", ev.item_scores["ppl"], ev.item_tokens["ppl"]) == pytest.approx(
        values["ppl"], rel=1e-5
    )


def test_chunks_partition_the_items_in_a_fixed_seeded_order(family: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(family["b"])
    whole = Evaluator(model, char_tokenizer(), _objectives(family["data"]), batch_size=16)
    whole.evaluate()

    def chunk_items(seed: int) -> tuple[list[set[int]], dict[int, float]]:
        ev = Evaluator(model, char_tokenizer(), _objectives(family["data"]), batch_size=16, chunks=(seed, 20))
        assert ev.looks() == 6  # 120 items in chunks of 20
        sets, bigram = [], {}
        for c in range(ev.looks()):
            ev.evaluate(chunk=c)
            sets.append(set(ev.item_scores["bigram"]))
            bigram.update(ev.item_scores["bigram"])
        return sets, bigram

    sets, bigram = chunk_items(7)
    assert [len(s) for s in sets] == [20] * 6 and set().union(*sets) == set(range(120))
    assert sets != [set(range(20 * c, 20 * c + 20)) for c in range(6)]  # shuffled, not in file order
    assert bigram == pytest.approx(whole.item_scores["bigram"], abs=1e-5)  # the same values, chunk by chunk
    assert chunk_items(7)[0] == sets  # every candidate of a campaign: the same order
    assert chunk_items(8)[0] != sets  # another campaign seed: another order


def _run_campaign(
    zoo: Path,
    tmp: Path,
    name: str,
    early_stop: str,
    layers: str = "{mode: greedy}",
    racing: str = "{mode: off}",
    extra: str = "",
    run_args: tuple[str, ...] = (),
) -> Campaign:
    """A layer campaign on the tiny zoo (two 0/1 objectives, 200 items each, no held-out part): greedy, or
    ``layers``; ``extra``: more study-file lines."""
    root = zoo.parents[1]
    study = tmp / f"{name}.yaml"
    study.write_text(
        f"name: {name}\nroot: {root}\n"
        "pool: {models: [storage/zoo-tiny/base, storage/zoo-tiny/spec_add, storage/zoo-tiny/spec_rev, "
        "storage/zoo-tiny/spec_fact]}\n"
        "objectives:\n"
        "  - {name: add, dataset: objectives/add.json, metric: token_accuracy, held_out: 0}\n"
        "  - {name: rev, dataset: objectives/rev.json, metric: token_accuracy, held_out: 0}\n"
        f"decisions: {{base: {{mode: fixed, model: storage/zoo-tiny/base}}, layers: {layers}}}\n"
        f"evaluation: {{early_stop: {early_stop}, racing: {racing}}}\n" + extra
    )
    url = f"sqlite:///{tmp}/{name}.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    assert main(["study", "run", name, "--storage", url, "--quiet", *run_args]) == 0
    return Campaign.load(name, url)


def _trials(campaign: Campaign) -> list[optuna.trial.FrozenTrial]:
    out = []
    for stage in campaign.plan:
        study = campaign.existing_stage_study(stage)
        assert study is not None
        out += study.get_trials()
    return out


def test_early_stopping_prunes_hopeless_candidates_and_keeps_the_decisions(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    off = _run_campaign(tiny_zoo, tmp_path, "esoff", "{mode: off}")
    off_knobs = _run_campaign(tiny_zoo, tmp_path, "esknobs", "{mode: off, alpha: 0.5, chunk: 5}")
    on = _run_campaign(tiny_zoo, tmp_path, "eson", "{mode: on, alpha: 0.05, chunk: 20}")
    # off: every knob inert, every evaluation complete with all its items
    decisions = {k: (d.winner, d.metrics) for k, d in off.decisions().items()}
    assert {k: (d.winner, d.metrics) for k, d in off_knobs.decisions().items()} == decisions
    off_trials = _trials(off)
    assert all(t.state == TrialState.COMPLETE for t in off_trials)
    for t in off_trials:
        assert t.user_attrs["n_items"] == (0 if "reused" in t.user_attrs else 400)  # 200 items, 2 objectives
        if "reused" not in t.user_attrs:
            assert len(unpack(t.user_attrs["i.add"])) == 200
    # on: hopeless layer candidates are stopped, with partial metrics
    on_trials = _trials(on)
    pruned = [t for t in on_trials if t.state == TrialState.PRUNED]
    assert pruned
    for t in pruned:
        assert 0 < t.user_attrs["n_items"] < 400 and "dominated by the " in t.user_attrs["pruned"]
        seen = unpack(t.user_attrs["i.add"])
        assert len(seen) == t.user_attrs["n_items"] // 2
        assert t.user_attrs["m.add"] == pytest.approx(sum(seen.values()) / len(seen))  # partial metrics
        assert Recipe.from_json(
            t.user_attrs["recipe"]
        ).layers  # a layer candidate (the base stage has no reference)
    decisions_on = on.decisions()
    for stage in on.plan:
        study = on.existing_stage_study(stage)
        assert study is not None
        stage_pruned = {str(t.user_attrs["candidate"]) for t in study.get_trials(states=(TrialState.PRUNED,))}
        decision = decisions_on[stage.key]
        assert set(decision.pruned) == stage_pruned and decision.winner not in stage_pruned
        assert set(decision.items) == {"add", "rev"}  # the winner's items: the next stage's reference
        note = stage_note(decision, ["add", "rev"], {"add": "maximize", "rev": "maximize"})
        assert ("Stopped early (PRUNED" in note) == bool(stage_pruned)  # shown in the dashboard
    assert on.final_recipe() == off.final_recipe()  # the same merged model
    spent_on = sum(int(t.user_attrs["n_items"]) for t in on_trials)
    spent_off = sum(int(t.user_attrs["n_items"]) for t in off_trials)
    print(f"item evaluations: early stop on {spent_on}, off {spent_off}")
    assert spent_on < spent_off


def _stop_rule() -> StopRule:
    """The rule of the campaigns below (two 0/1 objectives, ``selection.score: mean``)."""
    maximize = {"add": "maximize", "rev": "maximize"}
    return StopRule(0.05, maximize, {"add": "token_accuracy", "rev": "token_accuracy"}, "mean")


def _objective_mean(t: optuna.trial.FrozenTrial) -> float:
    return (t.user_attrs["m.add"] + t.user_attrs["m.rev"]) / 2


def _items(trial: optuna.trial.FrozenTrial, name: str) -> dict[int, float]:
    return unpack(trial.user_attrs[f"i.{name}"]) if f"i.{name}" in trial.user_attrs else {}


def test_joint_stage_stops_against_the_leader_and_races(tiny_zoo: Path, tmp_path: Path) -> None:
    joint = "{mode: joint, n_trials: 16, warm_start: true, sampler: tpe}"
    mean = "selection: {score: mean}\nsampler: {name: tpe, seed: 3}\n"
    off = _run_campaign(tiny_zoo, tmp_path, "joff", "{mode: off}", joint, extra=mean)
    knobs = _run_campaign(
        tiny_zoo, tmp_path, "jknobs", "{mode: off, boundary: bonferroni}", joint, "{mode: off, eta: 5}", mean
    )
    on = _run_campaign(tiny_zoo, tmp_path, "jon", "{mode: on}", joint, "{mode: on, eta: 3}", mean)
    # both off: every knob inert, the same decisions
    decisions = [(k, d.winner, d.metrics) for k, d in off.decisions().items()]
    assert [(k, d.winner, d.metrics) for k, d in knobs.decisions().items()] == decisions
    stage = on.plan[-1]
    study = on.existing_stage_study(stage)
    assert study is not None and get_kind(stage.kind).joint
    spare = replace(_stop_rule(), spare_front=True)
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    raced = [t for t in pruned if "racing: rank" in t.user_attrs["pruned"]]
    led = [t for t in pruned if "the stage's leader (trial " in t.user_attrs["pruned"]]
    print(
        f"joint stage: {len(pruned)} of {len(trials)} stopped, {len(raced)} by racing, "
        f"{len(led)} against the leader"
    )
    assert raced
    for t in pruned:  # partial metrics over the items it was scored on
        seen = unpack(t.user_attrs["i.add"])
        assert 0 < len(seen) < 200 and t.user_attrs["m.add"] == pytest.approx(sum(seen.values()) / len(seen))
    for t in led:  # the leader: the best objective mean among the COMPLETE trials (with items) before it
        number = int(t.user_attrs["pruned"].split("leader (trial ")[1].split(")")[0])
        earlier = [u for u in trials if u.number < t.number and u.state == TrialState.COMPLETE
                   and "i.add" in u.user_attrs]  # fmt: skip
        assert _objective_mean(trials[number]) == max(_objective_mean(u) for u in earlier)
        # spare_front (the default): it was ahead of the leader on no objective, on its items
        its, leaders = ({n: _items(u, n) for n in ("add", "rev")} for u in (t, trials[number]))
        assert not ahead_on(paired_looks(its, leaders, spare.directions, spare.metric_of, 0.0, "mean"))
    decision = on.decisions()[stage.key]
    labels = {str(t.user_attrs["candidate"]) for t in pruned}
    assert set(decision.pruned) == labels and decision.winner not in labels  # stopped trials never win
    # near-ties: every race-stopped candidate not significantly worse than the final leader was resumed
    rule = NearTies(_stop_rule(), ["add", "rev"], 0.05)
    leader = rule.leader(trials)
    assert leader is not None and str(leader.user_attrs["candidate"]) == decision.winner
    resumed = {int(t.user_attrs[RESUME_ATTR]): t for t in trials if RESUME_ATTR in t.user_attrs}
    print(f"near-ties resumed: {sorted(resumed)} of the raced {[t.number for t in raced]}")
    assert resumed and set(resumed) <= {t.number for t in raced}
    assert rule.due(trials) == []
    # one resume per model (a sampler repeats itself), none for a model with a COMPLETE trial
    models = [t.user_attrs["recipe"] for t in resumed.values()]
    assert len(set(models)) == len(models)
    assert not set(models) & {t.user_attrs["recipe"] for t in trials if t.state == TrialState.COMPLETE
                              and RESUME_ATTR not in t.user_attrs}  # fmt: skip
    for t in raced:
        assert t.user_attrs["raced"] is True
        if t.number not in resumed:
            # significantly worse than the leader on its items, or its model resumed from another trial
            assert not rule.near(t, leader) or t.user_attrs["recipe"] in models
            continue
        again = resumed[t.number]  # its items read, only the rest evaluated; no race
        assert "racing" not in str(again.user_attrs.get("pruned", ""))
        before, after = unpack(t.user_attrs["i.add"]), unpack(again.user_attrs["i.add"])
        assert before.items() <= after.items() and len(after) > len(before)
        fresh = sum(len(unpack(again.user_attrs[f"i.{n}"])) - len(unpack(t.user_attrs[f"i.{n}"]))
                    for n in ("add", "rev"))  # fmt: skip
        # the new items are evaluated, or read from the evaluation cache where a stopped trial of the same
        # model was scored on more chunks (then none is counted as evaluated)
        if "cached" in again.user_attrs:
            assert again.user_attrs["n_items"] < fresh
        else:
            assert again.user_attrs["n_items"] == fresh > 0
        if again.state == TrialState.COMPLETE:
            assert len(after) == 200 and again.params == t.params
    # a sampler's repeat of a stopped model that scored no new item costs no budget (``repeat_of``)
    for t in trials:
        same = [
            u for u in trials if u.number < t.number and u.user_attrs.get("recipe") == t.user_attrs["recipe"]
        ]
        scored = {(n, i) for u in same for n in ("add", "rev") for i in _items(u, n)}
        mine = {(n, i) for n in ("add", "rev") for i in _items(t, n)}
        repeat = bool(same) and bool(mine) and mine <= scored and RESUME_ATTR not in t.user_attrs
        assert ("repeat_of" in t.user_attrs) == repeat, t.number
        if repeat:
            assert t.user_attrs["repeat_of"] == same[0].number and t.user_attrs["n_items"] == 0
    assert sum(costs_budget(t) for t in trials if RESUME_ATTR not in t.user_attrs) == 16
    print(f"repeats of stopped models: {[t.number for t in trials if 'repeat_of' in t.user_attrs]}")
    off_study = off.existing_stage_study(off.plan[-1])
    assert off_study is not None
    spent_off = sum(int(t.user_attrs.get("n_items", 0)) for t in off_study.get_trials())
    assert sum(int(t.user_attrs.get("n_items", 0)) for t in trials) < spent_off


def test_early_stopping_and_racing_with_two_worker_processes(tiny_zoo: Path, tmp_path: Path) -> None:
    """Spawned workers get the leader's items and the race's peers (pickled); stopped trials never win."""
    joint = "{mode: joint, n_trials: 10, warm_start: true, sampler: tpe}"
    mean = "selection: {score: mean}\n"
    campaign = _run_campaign(
        tiny_zoo, tmp_path, "jw2", "{mode: on}", joint, "{mode: on}", mean, ("--workers", "2")
    )
    stage = campaign.plan[-1]
    study = campaign.existing_stage_study(stage)
    assert study is not None
    trials = study.get_trials()
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    pruned = {str(t.user_attrs["candidate"]) for t in trials if t.state == TrialState.PRUNED}
    reasons = [str(t.user_attrs["pruned"]) for t in trials if t.state == TrialState.PRUNED]
    assert pruned and all(
        any(why in r for why in ("the stage's leader (trial", "the incumbent", "racing: rank"))
        for r in reasons
    )
    decision = campaign.decisions()[stage.key]
    assert set(decision.pruned) == pruned and decision.winner not in pruned


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("{early_stop: {mode: maybe}}", "evaluation.early_stop.mode"),
        ("{early_stop: {mode: on, alpha: 1.5}}", "evaluation.early_stop.alpha"),
        ("{early_stop: {mode: on, chunk: 0}}", "evaluation.early_stop.chunk"),
        ("{early_stop: {mode: on, looks: 3}}", "evaluation.early_stop.looks: unknown key"),
        ("{early_stop: {boundary: pocok}}", "evaluation.early_stop.boundary"),
        ("{racing: {mode: on, eta: 1}}", "evaluation.racing.eta"),
        ("{racing: {first: 0}}", "evaluation.racing.first"),
        ("{racing: {rungs: 3}}", "evaluation.racing.rungs: unknown key"),
        ("{racing: {mode: auto}}", "evaluation.racing.mode"),  # no auto: off unless asked for
        ("{early_stop: {spare_front: maybe}}", "evaluation.early_stop.spare_front"),
        ("{early_stop: {spare_level: 0}}", "evaluation.early_stop.spare_level"),
        ("{early_stop: {spare_level: 1.5}}", "evaluation.early_stop.spare_level"),
    ],
)
def test_bad_early_stop_settings_are_one_line(
    family: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], block: str, message: str
) -> None:
    study = tmp_path / "bad.yaml"
    study.write_text(
        f"name: bad\npool: {{models: [{family['a']}, {family['b']}]}}\n"
        f"objectives: [{{dataset: {family['data']}, metric: perplexity}}]\n"
        f"evaluation: {block}\n"
    )
    url = f"sqlite:///{tmp_path}/bad.db"
    assert main(["study", "create", str(study), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "bad.db").exists()  # nothing written


def test_spare_level_reaches_the_stop_rule(family: dict[str, Path], tmp_path: Path) -> None:
    """``evaluation.early_stop.spare_level`` in a study file is the level of the rule every evaluation
    of the campaign stops by (``EvalContext.stop_rule``)."""
    from types import SimpleNamespace

    from olmopt.config import load_study_file
    from olmopt.search.context import EvalContext, objectives_of

    study = tmp_path / "spare.yaml"
    study.write_text(
        f"name: spare\npool: {{models: [{family['a']}, {family['b']}]}}\n"
        f"objectives: [{{dataset: {family['data']}, metric: perplexity}}]\nselection: {{score: mean}}\n"
        "evaluation: {early_stop: {spare_level: 0.2}}\n"
    )
    config = load_study_file(study)
    rule = EvalContext.stop_rule.fget(SimpleNamespace(config=config, objectives=objectives_of(config)))
    assert (rule.score, rule.spare_front, rule.spare_level) == ("mean", True, 0.2)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [("{score: mean}", ("on", "off")), ("{score: copeland}", ("off", "off")), ("{}", ("off", "off"))],
)
def test_default_modes_early_stopping_only_under_the_mean(
    family: dict[str, Path], tmp_path: Path, selection: str, expected: tuple[str, str]
) -> None:
    """``early_stop.mode: auto`` (the default) is on under ``score: mean`` and off under Copeland;
    racing is off unless asked for, whatever the score."""
    from olmopt.config import load_study_file

    study = tmp_path / "modes.yaml"
    study.write_text(
        f"name: modes\npool: {{models: [{family['a']}, {family['b']}]}}\n"
        f"objectives: [{{dataset: {family['data']}, metric: perplexity}}]\nselection: {selection}\n"
    )
    ev = load_study_file(study).evaluation
    assert (ev.early_stop.mode, ev.racing.mode) == expected
    assert ev.early_stop.spare_front  # candidates ahead on some objective are not stopped (mean rule)
    assert ev.early_stop.spare_level == 1.0  # any lead


def test_rerun_with_early_stopping_and_racing_replays_the_stops_from_the_cache(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """The evaluation cache keeps stopped candidates' partial per-item values: a re-run under a new name
    replays every stop (the same PRUNED trials, the same reasons), resumes the same near-ties and
    decides the same, spending (almost) no item evaluations."""
    joint = "{mode: joint, n_trials: 16, warm_start: true, sampler: tpe}"
    mean = "selection: {score: mean}\nsampler: {name: tpe, seed: 3}\n"
    args = ("{mode: on}", joint, "{mode: on, eta: 3}", mean)
    first = _run_campaign(tiny_zoo, tmp_path, "first", *args)
    study = tmp_path / "again.yaml"
    study.write_text((tmp_path / "first.yaml").read_text().replace("name: first", "name: again"))
    url = f"sqlite:///{tmp_path}/first.db"
    assert main(["study", "create", str(study), "--storage", url]) == 0
    assert main(["study", "run", "again", "--storage", url, "--quiet"]) == 0
    again = Campaign.load("again", url)
    spent = sum(int(t.user_attrs.get("n_items", 0)) for t in _trials(first))
    respent = sum(int(t.user_attrs.get("n_items", 0)) for t in _trials(again))
    print(f"item evaluations: first run {spent}, re-run {respent}")
    assert spent > 0 and respent <= 0.05 * spent
    assert [(k, d.winner, d.metrics, d.pruned) for k, d in again.decisions().items()] == [
        (k, d.winner, d.metrics, d.pruned) for k, d in first.decisions().items()
    ]

    def stops(campaign: Campaign) -> list[tuple[int, str, str]]:
        return [(t.number, t.state.name, str(t.user_attrs.get("pruned"))) for t in _trials(campaign)]

    assert stops(again) == stops(first)
    pruned = [t for t in _trials(again) if t.state == TrialState.PRUNED]
    assert pruned and all(t.user_attrs.get("cached") == "first" for t in pruned)
