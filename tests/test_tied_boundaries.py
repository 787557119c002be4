"""``decisions.boundary: {mode: joint, donors: tied}``: the joint stage's boundary slot offers the boundaries
of the base candidates tied with the base winner, one per distinct set of boundary weights."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from olmopt.cli import main
from olmopt.config import StudyConfig, load_study_file
from olmopt.recipe import Recipe
from olmopt.search.api import campaign_status
from olmopt.search.decision import CandidateResult, Decision
from olmopt.search.kind import Stage
from olmopt.search.tied_boundaries import boundary_digest, tied_with_winner
from tests.test_study import study_file

_SHARES = {"a": "token_accuracy", "b": "mc_accuracy"}
_MAX = {"a": "maximize", "b": "maximize"}


def _base_decision(means: dict[str, tuple[float, float]], winner: str, **extra: object) -> Decision:
    candidates = {
        m: CandidateResult({"a": a, "b": b}, True, i) for i, (m, (a, b)) in enumerate(means.items())
    }
    return Decision(
        stage="000-base",
        winner=winner,
        trial=0,
        recipe=Recipe(base=winner),
        metrics=candidates[winner].metrics,
        candidates=candidates,
        **extra,  # type: ignore[arg-type]
    )


def test_tied_with_winner_is_the_winners_95_percent_half_width() -> None:
    """Winner w: a 0.6, b 0.5 on 100 items each: mean 0.55, variance (0.24 + 0.25) / 100 / 4 = 0.001225,
    half-width 1.96 * 0.035 = 0.0686, so the floor is 0.4814: x (0.50) ties, y (0.45) does not, z above
    the winner (a Copeland winner need not have the best mean) ties; infeasible and stopped candidates
    never do."""
    decision = _base_decision(
        {
            "w": (0.6, 0.5),
            "x": (0.5, 0.5),
            "y": (0.45, 0.45),
            "z": (0.7, 0.5),
            "bad": (0.6, 0.5),
            "p": (0.6, 0.5),
        },
        "w",
        pruned={"p": "stopped early"},
    )
    decision.candidates["bad"] = CandidateResult({"a": 0.6, "b": 0.5}, False, 9)
    tied = tied_with_winner(decision, {"a": 100, "b": 100}, _MAX, _SHARES)
    assert list(tied) == ["z", "w", "x"]
    assert tied == pytest.approx({"z": 0.6, "w": 0.55, "x": 0.5})
    # 0.4814 is the floor: a candidate just above it ties, one just below does not
    edge = _base_decision({"w": (0.6, 0.5), "u": (0.4815, 0.4815), "v": (0.4813, 0.4813)}, "w")
    assert list(tied_with_winner(edge, {"a": 100, "b": 100}, _MAX, _SHARES)) == ["w", "u"]
    # no interval, no ties: a minimised objective, a score that is not a share of items
    assert tied_with_winner(decision, {"a": 100, "b": 100}, {"a": "maximize", "b": "minimize"}, _SHARES) == {}
    assert tied_with_winner(decision, {"a": 100, "b": 100}, _MAX, {"a": "token_accuracy", "b": "bleu"}) == {}


def _env(tiny_zoo: Path, tmp_path: Path, base: Decision | None) -> SimpleNamespace:
    from olmopt.search.context import open_pool

    path = study_file(
        tmp_path, tiny_zoo, "tied", layers={"mode": "joint", "n_trials": 10, "warm_start": True}
    )
    data = yaml.safe_load(path.read_text())
    data["decisions"]["base"] = {"mode": "auto"}
    data["decisions"]["boundary"] = {"mode": "joint", "donors": "tied"}
    path.write_text(yaml.safe_dump(data))
    config = load_study_file(path)
    pool = open_pool(config)
    names = list(pool[pool.names[0]].checkpoint.keys())
    context = SimpleNamespace(
        objectives=[SimpleNamespace(name=o.name, metric=o.metric) for o in config.objectives],
        item_counts=lambda split: dict.fromkeys(("add", "rev", "fact", "mc"), 60),
    )
    decisions = {"000-base": base} if base is not None else {}
    return SimpleNamespace(
        config=config, pool_names=pool.names, adapter=pool.adapter, param_names=names, pool=pool,
        context=context, decisions=decisions,
    )  # fmt: skip


def _zoo_decision(zoo: Path, means: dict[str, float], winner: str) -> Decision:
    """A base decision over the tiny zoo's models with every objective at the model's given mean."""
    candidates = {
        str(zoo / m): CandidateResult(dict.fromkeys(("add", "rev", "fact", "mc"), v), True, i)
        for i, (m, v) in enumerate(means.items())
    }
    w = str(zoo / winner)
    return Decision(
        stage="000-base", winner=w, trial=0, recipe=Recipe(base=w), metrics=candidates[w].metrics,
        candidates=candidates,
    )  # fmt: skip


def test_the_offer_has_one_donor_per_distinct_boundary_and_no_slot_without_a_tie(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """The tiny zoo's layer specialists (spec_fact, spec_mc) keep the base's boundary, the full ones
    (spec_add, spec_rev) have their own (docs/zoo.md). Winner spec_add at 0.50 on 60 items per objective:
    half-width 1.96 * sqrt(4 * 0.25 / 60) / 4 = 0.0632, so spec_fact (0.45) ties, spec_rev (0.40) does not;
    spec_fact's boundary is the base's, so it stands for base and spec_mc too."""
    from olmopt.search.kinds.joint import joint_distributions, joint_space

    p = {m: str(tiny_zoo / m) for m in ("base", "spec_add", "spec_rev", "spec_mc", "spec_fact")}
    env = _env(tiny_zoo, tmp_path, None)
    digests = {m: boundary_digest(env.pool, env.adapter, env.param_names, path) for m, path in p.items()}
    assert digests["base"] == digests["spec_fact"] == digests["spec_mc"]
    assert len({digests["base"], digests["spec_add"], digests["spec_rev"]}) == 3

    means = {"base": 0.40, "spec_add": 0.50, "spec_rev": 0.40, "spec_mc": 0.30, "spec_fact": 0.45}
    env.decisions = {"000-base": _zoo_decision(tiny_zoo, means, "spec_add")}
    stage = Stage(1, "joint-layers", "", 10, 1)
    space = joint_space(stage, Recipe(base=p["spec_add"]), env)  # type: ignore[arg-type]
    warm = dict(space.enqueue)
    assert warm["incumbent"] == {"boundary": p["spec_add"], **{f"layer.{i}": p["spec_add"] for i in range(4)}}
    assert warm[f"all-{p['base']}"]["boundary"] == p["spec_fact"]  # the same weights, offered as spec_fact
    assert warm[f"all-{p['spec_rev']}"]["boundary"] == p["spec_add"]  # not offered: the incumbent's
    assert joint_distributions(stage, env)["boundary"].choices == (p["spec_add"], p["spec_fact"])  # type: ignore[arg-type]
    assert space.details is not None
    offer = space.details({})["boundary_offer"]
    assert offer["offered"] == [p["spec_add"], p["spec_fact"]]
    assert offer["tied"] == pytest.approx({p["spec_add"]: 0.50, p["spec_fact"]: 0.45})

    # after a merge stage the incumbent's boundary is the merge's own, offered first beside the tied ones
    from olmopt.recipe import MERGE_DONOR
    from olmopt.search.tied_boundaries import tied_boundaries

    merged = tied_boundaries(env, MERGE_DONOR)  # type: ignore[arg-type]
    assert merged.offered == [MERGE_DONOR, p["spec_add"], p["spec_fact"]]
    assert merged.same_as[p["base"]] == p["spec_fact"] and MERGE_DONOR not in merged.same_as

    # spec_fact below the floor: only the winner's boundary is tied, so the joint stage has no boundary slot
    env.decisions = {"000-base": _zoo_decision(tiny_zoo, {**means, "spec_fact": 0.43}, "spec_add")}
    alone = joint_space(stage, Recipe(base=p["spec_add"]), env)  # type: ignore[arg-type]
    assert set(dict(alone.enqueue)["incumbent"]) == {f"layer.{i}" for i in range(4)}
    assert "boundary" not in joint_distributions(stage, env)


def test_a_campaign_offers_the_tied_boundaries_and_has_no_boundary_polish(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    """End to end on the tiny zoo: the joint stage records the offer its base stage's figures give (recomputed
    here from the stored base decision), samples only offered boundaries, and the polish sweep has no
    boundary stage."""
    from olmopt.search.campaign import Campaign

    url = f"sqlite:///{tmp_path}/s.db"
    layers = {
        "mode": "joint",
        "n_trials": 8,
        "warm_start": True,
        "sampler": "random",
        "polish": 1,
        "only": [3],
    }
    path = study_file(tmp_path, tiny_zoo, "tied", layers=layers, boundary={"mode": "joint", "donors": "tied"})
    data = yaml.safe_load(path.read_text())
    data["decisions"]["base"] = {"mode": "auto"}
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", "tied", "--storage", url, "--quiet"]) == 0
    keys = [s["stage"] for s in campaign_status("tied", url)["stages"]]
    assert keys == ["000-base", "001-joint-layers", "002-polish-layer-3"]
    decisions = Campaign.load("tied", url).decisions()
    base, joint = decisions["000-base"], decisions["001-joint-layers"]
    counts = {o["name"]: 60 for o in data["objectives"]}  # no held-out part: every sample is searched
    tied = tied_with_winner(base, counts, dict.fromkeys(counts, "maximize"), _metrics(data))
    offer = joint.details["boundary_offer"]
    assert offer["tied"] == pytest.approx(tied) and base.winner in tied
    assert offer["offered"][0] == base.winner and set(offer["offered"]) <= set(tied)
    study = optuna.load_study(study_name="tied/001-joint-layers", storage=url)
    sampled = {t.params.get("boundary", base.winner) for t in study.trials}
    assert sampled <= set(offer["offered"])


def _metrics(data: dict[str, object]) -> dict[str, str]:
    return {o["name"]: o["metric"] for o in data["objectives"]}  # type: ignore[attr-defined, index]


@pytest.mark.parametrize(
    ("decisions", "needle"),
    [
        ({"boundary": {"mode": "greedy", "donors": "tied"}}, "needs mode: joint"),
        ({"boundary": {"mode": "joint", "donors": "tied"}}, "decisions.base: {mode: auto}"),  # base fixed
        ({"boundary": {"mode": "joint", "donors": "some"}}, "decisions.boundary.donors"),
    ],
)
def test_bad_tied_boundary_settings_are_one_line(
    tmp_path: Path, tiny_zoo: Path, capsys, decisions, needle
) -> None:
    path = study_file(tmp_path, tiny_zoo, "bad", layers={"mode": "joint", "n_trials": 5}, **decisions)
    url = f"sqlite:///{tmp_path}/s.db"
    assert main(["study", "create", str(path), "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "s.db").exists()


def test_tied_is_valid_with_base_auto() -> None:
    data = {
        "name": "ok", "pool": {"models": ["a", "b"]},
        "objectives": [{"name": "x", "dataset": "x.json", "metric": "token_accuracy"}],
        "decisions": {"base": {"mode": "auto"}, "layers": {"mode": "joint", "n_trials": 5},
                      "boundary": {"mode": "joint", "donors": "tied"}},
    }  # fmt: skip
    assert StudyConfig.model_validate(data).decisions.boundary.donors == "tied"
