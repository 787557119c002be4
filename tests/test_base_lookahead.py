"""``decisions.base: {mode: auto, lookahead: N}``: before the joint layer stage, each base candidate tied
with the winner on a boundary of its own gets every other pool model's run of adjacent layers, and a
switch to its boundary must be significant; the evaluations come out of the joint layer stage's budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from olmopt.cli import main
from olmopt.config import StudyConfig
from olmopt.recipe import Recipe
from olmopt.search.decision import CandidateResult, Decision
from olmopt.search.kind import Stage
from olmopt.search.kinds.base_lookahead import (
    INCUMBENT,
    lookahead_candidates,
    lookahead_space,
    lookahead_spent,
)
from olmopt.search.kinds.joint import joint_space, layer_runs
from tests.test_study import study_file, with_held_out
from tests.test_tied_boundaries import _env, _zoo_decision

MODELS = ("base", "spec_add", "spec_rev", "spec_mc", "spec_fact")


def test_layer_runs_cut_adjacent_layers_larger_runs_first() -> None:
    assert layer_runs(list(range(6)), 2) == [[0, 1, 2], [3, 4, 5]]
    assert layer_runs(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert layer_runs(list(range(2)), 4) == [[0], [1]]


def _lookahead_env(tiny_zoo: Path, tmp_path: Path, means: dict[str, float], winner: str) -> Any:
    env = _env(tiny_zoo, tmp_path, None)
    env.config.decisions.base.lookahead = 2
    env.config.decisions.layers.n_trials = 30  # 24 beyond its 6 warm starts: three tied bases
    env.decisions = {"000-base": _zoo_decision(tiny_zoo, means, winner)}
    return env


def test_candidates_are_each_donors_runs_on_the_tied_boundaries_of_their_own(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """Winner spec_add at 0.50 on 60 items per objective ties down to 0.4368 (test_tied_boundaries):
    spec_fact (0.45) and spec_mc (0.44) tie but share the base's boundary, so spec_fact (the better) stands
    for both; spec_rev (0.40) does not tie. On spec_fact, each of the other four models in layers 0-1 and
    in layers 2-3: 8 candidates besides the incumbent."""
    p = {m: str(tiny_zoo / m) for m in MODELS}
    means = {"base": 0.40, "spec_add": 0.50, "spec_rev": 0.40, "spec_mc": 0.44, "spec_fact": 0.45}
    env = _lookahead_env(tiny_zoo, tmp_path, means, "spec_add")
    incumbent = Recipe(base=p["spec_add"])
    candidates = lookahead_candidates(incumbent, env)
    assert candidates[INCUMBENT] == incumbent and len(candidates) == 9
    fact = p["spec_fact"]
    for donor in ("base", "spec_add", "spec_rev", "spec_mc"):
        low, high = candidates[f"{fact}/block0-{p[donor]}"], candidates[f"{fact}/block1-{p[donor]}"]
        assert low == Recipe(base=fact, layers={0: p[donor], 1: p[donor]})
        assert high == Recipe(base=fact, layers={2: p[donor], 3: p[donor]})
    space = lookahead_space(Stage(1, "base-lookahead"), incumbent, env)
    assert space.significant_boundary_switch and space.budget is None and space.switch_confidence is None
    env.config.decisions.base.switch_confidence = 0.8  # the switch's own level, else the selection's
    assert lookahead_space(Stage(1, "base-lookahead"), incumbent, env).switch_confidence == 0.8
    env.config.decisions.base.switch_confidence = None
    assert [label for label, _ in space.enqueue] == list(candidates)
    assert space.details is not None
    assert space.details({}) == {"lookahead_bases": [fact], "lookahead_skipped": []}

    # a joint stage of 10 evaluations has 4 beyond its 6 warm starts (incumbent, 5 whole models): too few
    # for one base's 8, so the lookahead skips spec_fact; with block warm starts (+10) even 20 are too few
    from olmopt.search.kinds.base_lookahead import affordable

    config = env.config
    assert affordable(config, 5) == 24
    config.decisions.layers.n_trials = 10
    assert affordable(config, 5) == 4 and list(lookahead_candidates(incumbent, env)) == [INCUMBENT]
    skipped = lookahead_space(Stage(1, "base-lookahead"), incumbent, env).details
    assert skipped is not None and skipped({}) == {"lookahead_bases": [], "lookahead_skipped": [fact]}
    config.decisions.layers.n_trials, config.decisions.layers.warm_blocks = 20, 2
    assert affordable(config, 5) == 20 - 16 and len(lookahead_candidates(incumbent, env)) == 1
    config.decisions.layers.n_trials, config.decisions.layers.warm_blocks = 30, 1
    config.decisions.layers.mode = "off"  # no joint stage: nothing pays, nothing is capped
    assert affordable(config, 5) is None and len(lookahead_candidates(incumbent, env)) == 9
    config.decisions.layers.mode = "joint"

    # only the searched layers are cut into runs
    env.config.decisions.layers.only = [1, 2, 3]
    narrow = lookahead_candidates(incumbent, env)
    assert narrow[f"{fact}/block0-{p['base']}"] == Recipe(base=fact, layers={1: p["base"], 2: p["base"]})
    assert narrow[f"{fact}/block1-{p['base']}"] == Recipe(base=fact, layers={3: p["base"]})
    env.config.decisions.layers.only = None

    # nothing tied on another boundary: the incumbent alone (its metrics reused, no evaluation)
    env.decisions = {
        "000-base": _zoo_decision(tiny_zoo, {**means, "spec_fact": 0.43, "spec_mc": 0.4}, "spec_add")
    }
    assert list(lookahead_candidates(incumbent, env)) == [INCUMBENT]


def test_with_warm_own_each_partial_fine_tunes_own_layers_join_unless_a_run_gave_them(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny zoo's layer specialists own exactly the runs (spec_fact layers 0-1, spec_mc 2-3, read from
    the digests): their own layers repeat block candidates and add nothing, yet the joint stage's two own
    starts are counted in ``affordable``. Where a specialist's own layers straddle the runs (spec_mc in
    1-2, patched), ``{base}/own-{donor}`` carries both onto the tied base."""
    from olmopt.search.kinds import base_lookahead
    from olmopt.search.kinds.base_lookahead import affordable, own_donors

    p = {m: str(tiny_zoo / m) for m in MODELS}
    means = {"base": 0.40, "spec_add": 0.50, "spec_rev": 0.40, "spec_mc": 0.44, "spec_fact": 0.45}
    env = _lookahead_env(tiny_zoo, tmp_path, means, "spec_add")
    incumbent, fact, mc = Recipe(base=p["spec_add"]), p["spec_fact"], p["spec_mc"]
    assert own_donors(env) == {}  # warm_own off
    env.config.decisions.layers.warm_own = True
    assert own_donors(env) == {fact: [0, 1], mc: [2, 3]}
    assert affordable(env.config, 5, 2) == 30 - 6 - 2
    assert len(lookahead_candidates(incumbent, env)) == 9  # spec_fact's 8 block candidates and the incumbent

    def straddling(donor: str, layers: list[int], _env: Any) -> list[int]:
        return {mc: [1, 2], fact: [0, 1]}.get(donor, [])

    monkeypatch.setattr(base_lookahead, "own_layers", straddling)
    candidates = lookahead_candidates(incumbent, env)
    assert len(candidates) == 10 and list(candidates)[-1] == f"{fact}/own-{mc}"
    assert candidates[f"{fact}/own-{mc}"] == Recipe(base=fact, layers={1: mc, 2: mc})
    env.config.decisions.layers.n_trials = 6 + 2 + 9  # one base costs 4 x 2 runs + 2 own: 9 do not pay
    assert list(lookahead_candidates(incumbent, env)) == [INCUMBENT]


def test_the_joint_stage_pays_for_the_lookahead(tiny_zoo: Path, tmp_path: Path) -> None:
    """The lookahead's candidates (stopped ones too, not the reused incumbent) come out of the joint
    layer stage's budget; never below one evaluation."""
    p = {m: str(tiny_zoo / m) for m in MODELS}
    metrics = dict.fromkeys(("add", "rev", "fact", "mc"), 0.5)
    labels = (INCUMBENT, "a", "b", "c")
    lookahead = Decision(
        stage="001-base-lookahead", winner=INCUMBENT, trial=0, recipe=Recipe(base=p["spec_add"]),
        metrics=metrics,
        candidates={label: CandidateResult(metrics, True, i) for i, label in enumerate(labels)},
        pruned={"d": "stopped early", "e": "stopped early"},
    )  # fmt: skip
    assert lookahead_spent({"001-base-lookahead": lookahead}) == 5
    assert lookahead_spent({}) == 0
    env = _lookahead_env(tiny_zoo, tmp_path, {m: 0.4 for m in MODELS}, "spec_add")
    env.decisions["001-base-lookahead"] = lookahead
    incumbent = Recipe(base=p["spec_add"])
    assert joint_space(Stage(2, "joint-layers", "", 12), incumbent, env).budget == 7
    assert joint_space(Stage(2, "joint-layers", "", 4), incumbent, env).budget == 1


def test_a_campaign_looks_ahead_switches_only_when_significant_and_resumes(
    tiny_zoo: Path, tmp_path: Path, cli: Any
) -> None:
    """End to end on the tiny zoo with 20 items per objective and, in the pool, a twin of the base
    winner on boundary bits of its own (so a candidate ties with the winner on another boundary whichever
    model wins on this CPU's zoo), run straight and again stopped by Ctrl-C inside the lookahead and
    resumed: the lookahead stage offers what the stored base decision gives, its winner is the incumbent
    or a significant switch, the joint stage spends its budget less the lookahead's evaluations, and both
    runs end on the same recipe."""
    from olmopt.search import trials as T
    from olmopt.search.campaign import Campaign

    def short(name: str, twin: bool, **decisions: object) -> tuple[Path, str]:
        path = study_file(tmp_path, tiny_zoo, name, **decisions)
        data = yaml.safe_load(path.read_text())
        for objective in data["objectives"]:
            objective["samples"] = 20
        data["pool"]["models"] += [str(tmp_path / "twin")] if twin else []
        path.write_text(yaml.safe_dump(data))
        return with_held_out(path), f"sqlite:///{tmp_path}/{name}.db"

    probe, url = short("probe", False, base={"mode": "auto"}, layers={"mode": "off"})
    assert main(["study", "create", str(probe), "--storage", url]) == 0
    assert main(["study", "run", "probe", "--storage", url, "--quiet"]) == 0
    _twin(Path(Campaign.load("probe", url).decisions()["000-base"].recipe.base), tmp_path / "twin")
    layers = {"mode": "joint", "n_trials": 24, "warm_start": True, "sampler": "tpe"}
    outcomes = []
    for name, interrupt in (("straight", False), ("resumed", True)):
        path, url = short(name, True, base={"mode": "auto", "lookahead": 2}, layers=layers)
        assert main(["study", "create", str(path), "--storage", url]) == 0
        if interrupt:
            proc = cli.start("study", "run", name, "--storage", url, "--quiet")
            cli.interrupt_when(
                proc, url, f"{name}/001-base-lookahead",
                lambda trials: sum(t.state in T.DONE_STATES for t in trials) >= 3,
            )  # fmt: skip
        assert main(["study", "run", name, "--storage", url, "--quiet"]) == 0
        campaign = Campaign.load(name, url)
        assert [s.key for s in campaign.plan] == ["000-base", "001-base-lookahead", "002-joint-layers"]
        decisions = campaign.decisions()
        base, ahead = decisions["000-base"], decisions["001-base-lookahead"]
        assert set(ahead.candidates) | set(ahead.pruned) == set(
            lookahead_candidates(base.recipe, _campaign_env(campaign, decisions))
        )
        spent = lookahead_spent(decisions)
        assert spent >= 8  # the four other models in two runs of layers on the twin's (or winner's) boundary
        if ahead.winner == INCUMBENT:
            assert ahead.recipe == base.recipe
        else:
            assert ahead.recipe.base != base.recipe.base and "significant" in ahead.reason
            assert "not significant" not in ahead.reason
        joint = campaign.existing_stage_study(campaign.plan[2])
        assert joint is not None
        evaluated = sum(T.costs_budget(t) for t in joint.get_trials(deepcopy=False, states=T.DONE_STATES))
        assert evaluated == 24 - spent
        outcomes.append((ahead.winner, ahead.reason, campaign.final_recipe()))
    assert outcomes[0] == outcomes[1]


def _twin(model: Path, out: Path) -> None:
    """A copy of ``model`` whose final norm is scaled by 1 + 2**-20: its boundary weights differ from the
    model's (another boundary digest), its scores do not in practice (a relative change of 1e-6 in the
    logits), so it ties with the model on any items."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    tensors = load_file(out / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * (1 + 2**-20)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


def _campaign_env(campaign: Any, decisions: dict[str, Decision]) -> Any:
    """The stage-building environment of a finished campaign, with the decisions before the lookahead."""
    from types import SimpleNamespace

    from olmopt.search.context import EvalContext, open_pool

    config = campaign.config
    pool = open_pool(config)
    names = list(pool[pool.names[0]].checkpoint.keys())
    context = EvalContext(config)
    return SimpleNamespace(
        config=config, pool_names=pool.names, adapter=pool.adapter, param_names=names, pool=pool,
        context=context, decisions={"000-base": decisions["000-base"]},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("base", "needle"),
    [
        ({"mode": "auto", "lookahead": 1}, "lookahead: 1 run of layers is the whole model"),
        ({"mode": "fixed", "lookahead": 2}, "lookahead looks ahead from the base decision's tied candidates"),
        ({"mode": "auto", "lookahead": 9}, "decisions.base.lookahead"),
        ({"mode": "auto", "switch_confidence": 0.8}, "switch_confidence is the lookahead's boundary switch"),
        ({"mode": "auto", "lookahead": 2, "switch_confidence": 1.5}, "decisions.base.switch_confidence"),
        ({"mode": "auto", "own_union": True}, "own_union is a candidate of the lookahead: needs lookahead"),
        ({"mode": "auto", "lookahead": 2, "own_union": True}, "own_union combines own layers: needs"),
    ],
)
def test_bad_lookahead_settings_are_one_line(tmp_path: Path, tiny_zoo: Path, capsys, base, needle) -> None:
    path = study_file(tmp_path, tiny_zoo, "bad", base=base, layers={"mode": "joint", "n_trials": 5})
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "s.db").exists()


def test_lookahead_is_valid_with_base_auto() -> None:
    data = {
        "name": "ok", "pool": {"models": ["a", "b"]},
        "objectives": [{"name": "x", "dataset": "x.json", "metric": "token_accuracy"}],
        "decisions": {"base": {"mode": "auto", "lookahead": 2}, "layers": {"mode": "joint", "n_trials": 5}},
    }  # fmt: skip
    assert StudyConfig.model_validate(data).decisions.base.lookahead == 2


def test_olm_report_names_the_new_base_only_after_a_switch() -> None:
    from olmopt.search.kinds.base_lookahead import BaseLookaheadKind

    metrics = {"a": 0.5}
    kind, stage = BaseLookaheadKind(), Stage(1, "base-lookahead")
    kept = Decision(stage=stage.key, winner=INCUMBENT, trial=0, recipe=Recipe(base="w"), metrics=metrics)
    assert kind.olm_report(stage, kept) == {}
    label = "c/block0-d"
    moved = Decision(
        stage=stage.key, winner=label, trial=3, recipe=Recipe(base="c", layers={0: "d"}), metrics=metrics
    )
    assert kind.olm_report(stage, moved) == {
        "base_model": {"name": "c", "lookahead": label, "metrics": metrics}
    }


def test_own_union_puts_every_partial_fine_tunes_own_layers_on_their_shared_boundary(
    tiny_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``base.own_union``: the winner spec_add is a full fine-tune; spec_fact (layers 0-1) and spec_mc
    (2-3) are partial fine-tunes on the base's boundary, tied with the winner or not, so the lookahead
    adds their own layers together there (``base/own-all``: the first pool model with that boundary
    holds it; dropped where a block candidate has those weights), paid before any tied base. None on the
    winner's own boundary, none where two own the same layer, none without the setting."""
    from olmopt.search.kinds import base_lookahead
    from olmopt.search.kinds.base_lookahead import affordable, lookahead_bases, own_unions, paid_unions

    p = {m: str(tiny_zoo / m) for m in MODELS}
    means = {"base": 0.40, "spec_add": 0.50, "spec_rev": 0.40, "spec_mc": 0.44, "spec_fact": 0.45}
    env = _lookahead_env(tiny_zoo, tmp_path, means, "spec_add")
    env.config.decisions.layers.warm_own = True
    incumbent, fact, mc = Recipe(base=p["spec_add"]), p["spec_fact"], p["spec_mc"]
    assert own_unions(incumbent, env) == {}  # own_union off
    env.config.decisions.base.own_union = True
    union = Recipe(base=p["base"], layers={0: fact, 1: fact, 2: mc, 3: mc})
    assert own_unions(incumbent, env) == {f"{p['base']}/own-all": union}
    # on the tied base spec_fact, spec_mc's upper half is the union already: no second candidate
    candidates = lookahead_candidates(incumbent, env)
    assert len(candidates) == 9 and f"{fact}/block1-{mc}" in candidates
    assert own_unions(Recipe(base=fact), env) == {}  # the incumbent is on the base's boundary already
    # the union costs one evaluation first: 30 - 6 - 2 = 22 pays one base of 4 x 2 + 2 = 10 with it;
    # at 6 + 2 + 10 only the union is paid
    assert affordable(env.config, 5, 2) == 22 and lookahead_bases(incumbent, env)[0] == [fact]
    env.config.decisions.layers.n_trials = 6 + 2 + 10
    assert lookahead_bases(incumbent, env) == ([], [fact])
    assert list(lookahead_candidates(incumbent, env)) == [INCUMBENT, f"{p['base']}/own-all"]
    env.config.decisions.layers.n_trials = 6 + 2  # nothing beyond the warm starts: not even the union
    assert paid_unions(incumbent, env) == ({}, 0)
    assert list(lookahead_candidates(incumbent, env)) == [INCUMBENT]

    def overlapping(donor: str, layers: list[int], _env: Any) -> list[int]:
        return {mc: [1, 2], fact: [0, 1]}.get(donor, [])

    monkeypatch.setattr(base_lookahead, "own_layers", overlapping)
    assert own_unions(incumbent, env) == {}
