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
from tests.test_ps_then_layers import Env
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

    class SameJson:
        def same_json(self, a: str, b: str) -> bool:
            return a == b

        def same(self, a: Recipe, b: Recipe) -> bool:
            return a.to_json() == b.to_json()

    rules = DecideRules(
        ["x", "y"], {"x": "maximize", "y": "maximize"}, [], SelectionConfig(score="mean", tolerance=0.0),
        True, True,
    )  # fmt: skip
    space = StageSpace(
        decode=lambda _t: ("z", recipes["m1"]), enqueue=[("incumbent", {})], held_out_veto=veto
    )
    d = decide(
        Stage(5, KIND, n_trials=2), trials, space, recipes["incumbent"], rules, SameJson(), None, score, "me"
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
