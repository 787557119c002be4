"""``decisions.merge: {mode: challenge}``: after the layer decisions, a parameter-space merge search on the
pool's base in which the layer merge is one more candidate (search/kinds/merge_challenge.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from olmopt.cli import main
from olmopt.config import StudyConfig
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import Recipe
from olmopt.search.kinds import get_kind
from olmopt.search.kinds.merge_challenge import CHALLENGER, INCUMBENT, challenge_space
from olmopt.search.plan import Stage, plan_stages
from olmopt.testing.kinds import NamesEnv as Env
from tests.test_study import run_twice, study_file, with_held_out

optuna.logging.set_verbosity(optuna.logging.WARNING)
POOL = ["base", "a", "b", "c"]
KIND = "joint-merge-challenge"


def _config(**decisions: Any) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "name": "t",
            "pool": {"models": POOL},
            "objectives": [{"dataset": "x.json", "metric": "token_accuracy"}],
            "decisions": decisions,
        }
    )


CHALLENGE = {"mode": "challenge", "n_trials": 6, "group_size": 2, "methods": ["task_arithmetic", "ties"]}


def test_the_challenge_comes_after_the_layers_and_their_polish() -> None:
    layers = {"mode": "joint", "n_trials": 5, "polish": 1}
    adapter = ArchitectureAdapter("llama", 4, False)
    kinds = [
        s.kind
        for s in plan_stages(_config(base={"mode": "auto"}, layers=layers, merge=CHALLENGE), adapter, [])
    ]
    assert kinds == ["base", "joint-layers", *["polish-layer"] * 4, KIND]
    before = [
        s.kind for s in plan_stages(_config(layers=layers, merge={**CHALLENGE, "mode": "joint"}), adapter, [])
    ]
    assert before == ["base", "joint-merge", "joint-layers", *["polish-layer"] * 4]
    last = plan_stages(_config(layers=layers, merge=CHALLENGE), adapter, [])[-1]
    assert (last.kind, last.n_trials) == (KIND, 6)


def test_the_incumbent_is_a_candidate_and_every_sampled_trial_a_merge_on_the_pool_base() -> None:
    """The layer merge (here on specialist a's base, as base: auto may leave it) is the first candidate and
    decodes to itself; the known-good merge points and every trial the stage's sampler adds are merges of
    the other pool models on the pool's base, never the incumbent again."""
    config = _config(base={"mode": "auto"}, layers={"mode": "joint", "n_trials": 5}, merge=CHALLENGE)
    incumbent = Recipe(base="a", layers={1: "b", 2: "c"})
    stage = Stage(6, KIND, n_trials=6)
    space = challenge_space(stage, incumbent, Env(config, list(POOL)))
    assert space.enqueue[0] == (INCUMBENT, {CHALLENGER: INCUMBENT}) and space.budget == 6
    study = optuna.create_study(
        directions=["maximize"], sampler=get_kind(KIND).sampler(stage, config, 3, None)
    )
    for _, params in space.enqueue:
        study.enqueue_trial(params)
    decoded = []
    for number in range(len(space.enqueue) + 12):
        trial = study.ask()
        label, recipe = space.decode(trial)
        decoded.append((label, recipe))
        study.tell(trial, float(number % 5))
    assert decoded[0] == (INCUMBENT, incumbent)
    merges = [recipe for _, recipe in decoded[1:]]
    assert all(r.param_merge is not None and r.base == "base" == r.param_merge.base for r in merges)
    assert all(set(r.param_merge.models) == {"a", "b", "c"} for r in merges if r.param_merge is not None)
    assert all(r.layers == {} for r in merges)
    assert len({r.to_json() for r in merges}) > 8  # the sampler explores the merge space


def test_the_challenge_sampler_resumes_exactly() -> None:
    """An interrupted stage suggests what an uninterrupted one would (TrialSeeded around the fixed
    ``challenger``): the same points after 3, 8 or 14 uninterrupted trials."""
    config = _config(layers={"mode": "joint", "n_trials": 5}, merge=CHALLENGE)
    stage = Stage(6, KIND, n_trials=14)
    space = challenge_space(stage, Recipe(base="base", layers={0: "a"}), Env(config, list(POOL)))

    def objective(trial: optuna.Trial) -> float:
        _, recipe = space.decode(trial)
        merge = recipe.param_merge
        return 0.0 if merge is None else float(len(merge.method)) + trial.number % 3

    def params(interrupt_after: int) -> list[dict[str, object]]:
        storage = optuna.storages.InMemoryStorage()
        kind = get_kind(KIND)
        study = optuna.create_study(
            directions=["maximize"], storage=storage, sampler=kind.sampler(stage, config, 5, None)
        )
        study.enqueue_trial(dict(space.enqueue[0][1]))
        study.optimize(objective, n_trials=interrupt_after)
        resumed = optuna.load_study(
            study_name=study.study_name, storage=storage, sampler=kind.sampler(stage, config, 5, None)
        )
        resumed.optimize(objective, n_trials=14 - interrupt_after)
        return [t.params for t in resumed.trials]

    assert params(3) == params(8) == params(14)


def test_a_campaign_keeps_the_better_of_the_layer_merge_and_the_challengers(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """End to end on the tiny zoo: the incumbent is the base model alone (no layer stage changes it), its
    metrics are reused (no evaluation), a merge of the specialists beats it on the search mean, and it
    wins when it leads on the held-out items too, else the held-out veto keeps the incumbent (the tiny
    family a CPU vendor trains decides which: on AMD the merge wins, on Intel it trails on the held-out
    items); the export loads in transformers, and a second run gives the same recipe."""
    from transformers import AutoModelForCausalLM

    from olmopt.search.campaign import Campaign

    merge = {**CHALLENGE, "methods": ["task_arithmetic"], "n_trials": 5}
    path = with_held_out(study_file(tmp_path, tiny_zoo, "ch", layers={"mode": "off"}, merge=merge))
    recipes = []
    for url in run_twice(path, "ch", tmp_path):
        campaign = Campaign.load("ch", url)
        decisions = campaign.decisions()
        assert list(decisions) == ["000-base", f"001-{KIND}"]
        base, challenge = decisions["000-base"], decisions[f"001-{KIND}"]
        incumbent = challenge.candidates[INCUMBENT]
        assert incumbent.metrics == base.metrics  # the layer merge's figures, reused
        means = {label: sum(c.metrics.values()) / len(c.metrics) for label, c in challenge.candidates.items()}
        leaders = [label for label, mean in means.items() if mean == max(means.values())]
        assert INCUMBENT not in leaders

        def held_out(label: str, candidates: dict[str, Any] = challenge.candidates) -> float:
            figures = candidates[label].held_out
            assert figures is not None  # the veto scores the leader and the incumbent on the held-out items
            return sum(figures.values())

        behind = held_out(INCUMBENT)
        if challenge.winner != INCUMBENT:  # a search leader that leads on the held-out items too
            assert challenge.winner in leaders and "held-out check" in challenge.reason
            assert held_out(challenge.winner) > behind
            merged = challenge.recipe.param_merge
            assert merged is not None and challenge.recipe.base == merged.base == str(tiny_zoo / "base")
        else:  # the search leader trails on the held-out items: vetoed
            vetoed = [lbl for lbl in leaders if f"held-out veto: {lbl!r}" in challenge.reason]
            assert len(vetoed) == 1, challenge.reason
            assert held_out(vetoed[0]) <= behind
            assert challenge.recipe == base.recipe and challenge.recipe.param_merge is None
        study = campaign.existing_stage_study(campaign.plan[1])
        assert study is not None
        first = study.get_trials(deepcopy=False)[0]
        assert first.params == {CHALLENGER: INCUMBENT} and first.user_attrs.get("reused") == "000-base"
        recipes.append(challenge.recipe.to_json())
    assert recipes[0] == recipes[1]
    out = tmp_path / "out"
    argv = ["export", "best", "ch", "--storage", url, "--out", str(out), "--quiet", "--no-compare"]
    assert main(argv) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4


def test_a_challenge_with_a_method_that_cannot_merge_the_pool_is_one_line(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = study_file(tmp_path, tiny_zoo, "bad", merge={"mode": "challenge", "methods": ["slerp"]})
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "decisions.merge.methods" in err[0], err
    assert not (tmp_path / "s.db").exists()


class _SameJson:
    """Model identity by Recipe JSON (no pool needed)."""

    def same_json(self, a: str, b: str) -> bool:
        return a == b

    def same(self, a: Recipe, b: Recipe) -> bool:
        return a.to_json() == b.to_json()


def _decide_veto(held: dict[str, float], veto: bool = True) -> tuple[str, str, dict[str, Any]]:
    """The incumbent (search means 0.5 / 0.3) against two merges: m1 leads on the search split (0.6 / 0.5),
    m2 trails; ``held``: the held-out mean of each label (both objectives)."""
    from olmopt.config import SelectionConfig
    from olmopt.search import trials as T
    from olmopt.search.decide import DecideRules, decide
    from olmopt.search.kind import StageSpace

    recipes = {
        "incumbent": Recipe(base="base", layers={0: "a"}),
        "m1": Recipe(base="base", layers={1: "b"}),
        "m2": Recipe(base="base", layers={2: "c"}),
    }
    values = {"incumbent": [0.5, 0.3], "m1": [0.6, 0.5], "m2": [0.4, 0.2]}
    trials = {}
    for number, (label, recipe) in enumerate(recipes.items()):
        trial = optuna.trial.create_trial(
            values=values[label], user_attrs={T.RECIPE_ATTR: recipe.to_json(), "feasible": True}
        )
        trial.number = number
        trials[label] = trial
    by_json = {r.to_json(): label for label, r in recipes.items()}
    asked: list[str] = []

    def score(recipe: Recipe, split: str) -> dict[str, float]:
        label = by_json[recipe.to_json()]
        asked.append(f"{label}:{split}")
        return {"x": held[label], "y": held[label]}

    rules = DecideRules(
        ["x", "y"], {"x": "maximize", "y": "maximize"}, [], SelectionConfig(score="mean", tolerance=0.0),
        True, True,
    )  # fmt: skip
    space = StageSpace(
        decode=lambda _t: ("z", recipes["m1"]), enqueue=[("incumbent", {})], held_out_veto=veto
    )
    d = decide(
        Stage(5, KIND, n_trials=2), trials, space, recipes["incumbent"], rules, _SameJson(), None, score, "me"
    )  # fmt: skip
    return d.winner, d.reason, {"held_out": d.held_out, "asked": asked, "candidates": d.candidates}


def test_a_challenger_must_also_lead_on_the_held_out_items() -> None:
    """m1 wins the search split; it replaces the incumbent only with a higher held-out mean (strictly):
    0.45 against 0.40 it does, 0.40 against 0.40 and 0.35 against 0.40 it does not. Without the veto
    m1 wins whatever its held-out figures."""
    winner, reason, seen = _decide_veto({"incumbent": 0.4, "m1": 0.45, "m2": 0.9})
    assert winner == "m1" and "held-out check: 0.4500 against 'incumbent''s 0.4000" in reason
    assert seen["held_out"] == {"x": 0.45, "y": 0.45} and "m2:held_out" not in seen["asked"]
    assert seen["candidates"]["incumbent"].held_out == {"x": 0.4, "y": 0.4}
    for held in (0.4, 0.35):
        winner, reason, seen = _decide_veto({"incumbent": 0.4, "m1": held, "m2": 0.9})
        assert winner == "incumbent" and f"held-out veto: 'm1' {held:.4f}, not above" in reason
        assert seen["held_out"] == {"x": 0.4, "y": 0.4}
    winner, reason, seen = _decide_veto({"incumbent": 0.4, "m1": 0.1, "m2": 0.9}, veto=False)
    assert winner == "m1" and "held-out" not in reason


def _trial(number: int, label: str, mean: float, state: str = "COMPLETE", reused: bool = False) -> Any:
    """A frozen trial of a joint layer stage: ``label``, both objectives at ``mean``."""
    from optuna.trial import TrialState

    from olmopt.search import trials as T

    attrs: dict[str, Any] = {T.LABEL_ATTR: label, "feasible": True}
    if reused:
        attrs[T.REUSED_ATTR] = "000-base"
    trial = optuna.trial.create_trial(
        state=TrialState[state], values=[mean, mean] if state == "COMPLETE" else None, user_attrs=attrs
    )
    trial.number = number
    return trial


YIELD = {**CHALLENGE, "yield_to_layers": True}


def _two_objectives(**decisions: Any) -> StudyConfig:
    data = _config(**decisions).model_dump(mode="json")
    data["objectives"] = [
        {"name": "x", "dataset": "x.json", "metric": "token_accuracy"},
        {"name": "y", "dataset": "y.json", "metric": "token_accuracy"},
    ]
    return StudyConfig.model_validate(data)


def test_the_layer_search_gets_the_challenge_s_trials_once_its_budget_ends_on_the_incumbent() -> None:
    """Budget 3 evaluations, extension 6 (the challenge's n_trials): granted only once the trials that spent
    the 3 are all finished and none of the feasible complete ones has a higher mean than the incumbent
    (the reused incumbent costs nothing; a pruned trial costs one and has no say); a lead elsewhere, or a
    trial still running inside the budget, leaves the budget at 3."""
    from olmopt.search.evaluation import budget_prefix, stage_budget
    from olmopt.search.kinds.joint import joint_space

    config = _two_objectives(base={"mode": "auto"}, layers={"mode": "joint", "n_trials": 3}, merge=YIELD)
    space = joint_space(Stage(1, "joint-layers", n_trials=3), Recipe(base="a"), Env(config, list(POOL)))
    assert space.budget == 3 and space.extension is not None and space.extension.evaluations == 6
    unmoved = [
        _trial(0, "incumbent", 0.5, reused=True),
        _trial(1, "all-b", 0.4),
        _trial(2, "#2", 0.0, state="PRUNED"),
        _trial(3, "#3", 0.5),  # a tie goes to the incumbent
        _trial(4, "#4", 0.9),  # after the budget: no say
    ]
    assert [t.number for t in budget_prefix(unmoved, 3) or []] == [0, 1, 2, 3]
    assert stage_budget(unmoved, space) == 9
    assert stage_budget(unmoved[:3], space) == 3  # the budget is not spent yet
    running = [*unmoved[:3], _trial(3, "#3", 0.0, state="RUNNING")]
    assert stage_budget(running, space) == 3
    # a failed trial (an interrupted run's) spends nothing: the next live one completes the budget
    failed = [*unmoved[:2], _trial(2, "#2", 0.0, state="FAIL"), _trial(3, "#3", 0.0, state="PRUNED")]
    failed.append(_trial(4, "#4", 0.5))
    assert [t.number for t in budget_prefix(failed, 3) or []] == [0, 1, 3, 4]
    assert stage_budget(failed, space) == 9
    moved = [*unmoved[:3], _trial(3, "#3", 0.51)]
    assert stage_budget(moved, space) == 3
    infeasible = [*unmoved[:3], _trial(3, "#3", 0.9)]
    infeasible[3].user_attrs["feasible"] = False
    assert stage_budget(infeasible, space) == 9
    without = replace_config(config, merge=CHALLENGE)
    plain = joint_space(Stage(1, "joint-layers", n_trials=3), Recipe(base="a"), Env(without, list(POOL)))
    assert plain.extension is None and stage_budget(unmoved, plain) == 3


def replace_config(config: StudyConfig, **decisions: Any) -> StudyConfig:
    data = config.model_dump(mode="json")
    data["decisions"].update(decisions)
    return StudyConfig.model_validate(data)


def test_the_challenge_yields_when_the_layer_stage_took_its_trials() -> None:
    """After a joint layer stage that recorded an extension the challenge offers the incumbent alone (no
    budget, nothing to evaluate) and says which stage took its trials; otherwise its merges."""
    from olmopt.search.decision import Decision
    from olmopt.search.kind import EXTENDED

    config = _config(base={"mode": "auto"}, layers={"mode": "joint", "n_trials": 5}, merge=YIELD)
    incumbent = Recipe(base="a", layers={1: "b"})
    stage = Stage(6, KIND, n_trials=6)

    def env(**details: Any) -> Env:
        joint = Decision(stage="001-joint-layers", winner="incumbent", trial=0, recipe=incumbent, metrics={})
        return Env(config, list(POOL), decisions={"001-joint-layers": joint.with_details(details)})

    yielded = challenge_space(stage, incumbent, env(**{EXTENDED: 6}))
    assert yielded.budget is None and yielded.enqueue == [(INCUMBENT, {CHALLENGER: INCUMBENT})]
    assert yielded.details is not None and yielded.details({}) == {"yielded_to": "001-joint-layers"}
    challenged = challenge_space(stage, incumbent, env())
    assert challenged.budget == 6 and len(challenged.enqueue) > 1 and challenged.details is None


@pytest.mark.parametrize(
    ("decisions", "message"),
    [
        ({"merge": {**YIELD, "mode": "joint"}, "layers": {"mode": "joint"}}, "yield_to_layers gives"),
        ({"merge": YIELD, "layers": {"mode": "greedy"}}, "decisions.layers has none"),
    ],
)
def test_yield_to_layers_needs_a_challenge_and_a_joint_layer_stage(
    decisions: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _config(**decisions)


def test_a_campaign_that_yields_resumes_to_the_same_recipe(tiny_zoo: Path, tmp_path: Path, cli: Any) -> None:
    """End to end on the tiny zoo, once straight and once stopped by Ctrl-C past the joint stage's budget
    and resumed: when the base decision's model still leads the joint layer stage after its 6
    evaluations, the stage spends the challenge's 5 more (11 in all) and the challenge evaluates nothing;
    otherwise the stage stops at 6 and the challenge runs. Either way both runs give the same recipe."""
    from olmopt.search import trials as T
    from olmopt.search.campaign import Campaign
    from olmopt.search.kind import EXTENDED

    merge = {**YIELD, "methods": ["task_arithmetic"], "n_trials": 5}
    layers = {"mode": "joint", "n_trials": 6, "warm_start": True}
    outcomes = []
    for name, interrupt in (("straight", False), ("resumed", True)):
        url = f"sqlite:///{tmp_path}/{name}.db"
        path = with_held_out(
            study_file(tmp_path, tiny_zoo, name, base={"mode": "auto"}, layers=layers, merge=merge)
        )
        assert main(["study", "create", str(path), "--storage", url]) == 0
        if interrupt:
            proc = cli.start("study", "run", name, "--storage", url, "--quiet")
            cli.interrupt_when(
                proc, url, f"{name}/001-joint-layers",
                lambda trials: sum(T.costs_budget(t) for t in trials if t.state in T.DONE_STATES) >= 8,
            )  # fmt: skip
        assert main(["study", "run", name, "--storage", url, "--quiet"]) == 0
        campaign = Campaign.load(name, url)
        decisions = campaign.decisions()
        joint, challenge = decisions["001-joint-layers"], decisions[f"002-{KIND}"]
        study = campaign.existing_stage_study(campaign.plan[1])
        assert study is not None
        spent = sum(T.costs_budget(t) for t in study.get_trials(deepcopy=False, states=T.DONE_STATES))
        challengers = campaign.existing_stage_study(campaign.plan[2])
        assert challengers is not None
        if joint.details.get(EXTENDED):
            assert joint.details[EXTENDED] == 5 and spent == 11
            assert challenge.details == {"yielded_to": "001-joint-layers"}
            assert len(challengers.trials) == 1 and challenge.recipe == joint.recipe
        else:
            assert spent == 6 and "yielded_to" not in challenge.details and len(challengers.trials) > 1
        outcomes.append((joint.details, challenge.recipe.to_json()))
    assert outcomes[0] == outcomes[1]


def _decide_challenge(n: int, confidence: float | None) -> tuple[str, str, list[tuple[str, str]]]:
    """The incumbent against merge m1, which leads by 0.25 on ``n`` search items and by 0.5 on ``n``
    held-out items (its held-out mean is higher, so the veto lets it pass); the challenge tested at
    ``confidence`` (None: the veto alone)."""
    from olmopt.config import SelectionConfig
    from olmopt.evaluate.item_scores import item_attrs
    from olmopt.search import trials as T
    from olmopt.search.decide import DecideRules, decide
    from olmopt.search.kind import StageSpace

    recipes = {"incumbent": Recipe(base="base", layers={0: "a"}), "m1": Recipe(base="base", layers={1: "b"})}
    search = {"incumbent": [1.0, 1.0, 0.0, 0.0] * (n // 4), "m1": [1.0, 1.0, 1.0, 0.0] * (n // 4)}
    held = {"incumbent": [1.0, 0.0] * (n // 2), "m1": [1.0, 1.0] * (n // 2)}
    trials = {}
    for number, (label, recipe) in enumerate(recipes.items()):
        values = search[label]
        attrs = {
            T.RECIPE_ATTR: recipe.to_json(),
            "feasible": True,
            **item_attrs({"acc": dict(enumerate(values))}),
        }
        trial = optuna.trial.create_trial(values=[sum(values) / len(values)], user_attrs=attrs)
        trial.number = number
        trials[label] = trial
    by_json = {r.to_json(): label for label, r in recipes.items()}
    calls: list[tuple[str, str]] = []

    def items_of(recipe: Recipe, split: str) -> dict[str, dict[int, float]]:
        label = by_json[recipe.to_json()]
        calls.append((label, split))
        return {"acc": dict(enumerate(held[label]))}

    def score(recipe: Recipe, split: str) -> dict[str, float]:
        values = held[by_json[recipe.to_json()]]
        return {"acc": sum(values) / len(values)}

    rules = DecideRules(
        ["acc"], {"acc": "maximize"}, [], SelectionConfig(score="mean"), True, True,
        {"acc": "token_accuracy"}, {"acc": n},
    )  # fmt: skip
    space = StageSpace(
        decode=lambda _t: ("z", recipes["m1"]),
        enqueue=[("incumbent", {})],
        held_out_veto=True,
        challenge_confidence=confidence,
    )
    d = decide(
        Stage(5, KIND, n_trials=2), trials, space, recipes["incumbent"], rules, _SameJson(), None, score,
        "me", items_of=items_of,
    )  # fmt: skip
    return d.winner, d.reason, calls


def test_a_challenger_must_lead_significantly_at_the_challenge_level() -> None:
    """``merge.switch_confidence``: m1 passes the held-out veto, then must beat the incumbent on the search
    and held-out items together (the boundary switch's pooled test): on 4 + 4 items its lead of +0.375 is
    not significant at 95 % (the incumbent wins) but is at 80 %; on 200 + 200 items it is at 95 %.
    Without a level the veto alone decides (m1 wins, nothing more is scored)."""
    winner, reason, calls = _decide_challenge(4, 0.95)
    assert winner == "incumbent", reason
    assert "held-out check" in reason
    assert (
        "'m1' leads 'incumbent' by +0.3750 on the search and held-out items, not significant at 0.95"
        in reason
    )
    assert sorted(calls) == [("incumbent", "held_out"), ("m1", "held_out")]  # search items from the trials
    winner, reason, _ = _decide_challenge(4, 0.8)
    assert winner == "m1" and reason.endswith("significant at 0.8"), reason
    winner, reason, _ = _decide_challenge(200, 0.95)
    assert winner == "m1" and reason.endswith("significant at 0.95"), reason
    winner, reason, calls = _decide_challenge(4, None)
    assert winner == "m1" and "significant" not in reason and calls == []


def test_switch_confidence_is_a_setting_of_the_challenge() -> None:
    with pytest.raises(ValueError, match="switch_confidence is the merge challenge's level; mode is 'joint'"):
        _config(merge={**CHALLENGE, "mode": "joint", "switch_confidence": 0.8})
    config = _config(merge={**CHALLENGE, "switch_confidence": 0.8}, layers={"mode": "joint", "n_trials": 4})
    space = challenge_space(Stage(1, KIND, n_trials=6), Recipe(base="base"), Env(config, list(POOL)))
    assert space.challenge_confidence == 0.8 and space.held_out_veto


def test_a_campaign_tests_its_challenger_on_the_incumbents_reused_items(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """End to end on the tiny zoo: the incumbent's search items come from the base decision (its metrics
    are reused); a leader that passes the held-out veto is then tested at 0.5 (it stands with any lead)
    and at 0.9999 (it needs a lead no 60-sample objective shows)."""
    from olmopt.search.campaign import Campaign

    for level, name in ((0.5, "lo"), (0.9999, "hi")):
        merge = {**CHALLENGE, "methods": ["task_arithmetic"], "n_trials": 5, "switch_confidence": level}
        path = with_held_out(study_file(tmp_path, tiny_zoo, name, layers={"mode": "off"}, merge=merge))
        url = f"sqlite:///{tmp_path}/{name}.db"
        assert main(["study", "create", str(path), "--storage", url]) == 0
        assert main(["study", "run", name, "--storage", url, "--quiet"]) == 0
        challenge = Campaign.load(name, url).decisions()[f"001-{KIND}"]
        if "held-out veto" in challenge.reason:  # the search leader trails on the held-out items
            assert challenge.winner == INCUMBENT and "significant" not in challenge.reason
            continue
        assert "leads 'incumbent' by +" in challenge.reason, challenge.reason
        if level == 0.5:
            assert challenge.winner != INCUMBENT and challenge.reason.endswith("significant at 0.5")
        else:
            assert challenge.winner == INCUMBENT and challenge.reason.endswith("so 'incumbent' wins")
