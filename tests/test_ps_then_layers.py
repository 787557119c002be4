"""Sakana's PS then layers: after a merge stage, the donor-choice stages (greedy layers, joint layers)
and the data-flow path may pick the parameter-space merge (``MERGE_DONOR``) like a pool model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from olmopt.config import StudyConfig
from olmopt.errors import InputError
from olmopt.methods.dfs.path import DfsPath
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import MERGE_DONOR, ParamMerge, Recipe
from olmopt.search.decision import Decision
from olmopt.search.kinds.dfs import dfs_distributions, dfs_space
from olmopt.search.kinds.joint import joint_distributions, joint_space
from olmopt.search.kinds.swap import current_donor, donor_pool, incumbent_of, swap_space
from olmopt.search.plan import Stage
from olmopt.testing.kinds import NamesEnv

optuna.logging.set_verbosity(optuna.logging.WARNING)
POOL = ["base", "a", "b"]
PS = Recipe(base="base", param_merge=ParamMerge(method="task_arithmetic", models=("a", "b")))


def _env(decisions: dict[str, Any], incumbent: Recipe | None = PS) -> NamesEnv:
    config = StudyConfig.model_validate(
        {
            "name": "t",
            "pool": {"models": POOL},
            "objectives": [{"dataset": "x.json", "metric": "token_accuracy"}],
            "decisions": decisions,
        }
    )

    def decided(stage: str, recipe: Recipe) -> Decision:
        return Decision(stage=stage, winner="w", trial=None, recipe=recipe, metrics={})

    before = {"001-joint-merge": decided("001-joint-merge", incumbent)} if incumbent is not None else {}
    return NamesEnv(
        config, list(POOL), decisions={"000-base": decided("000-base", Recipe(base="base")), **before}
    )


def _decode(space: Any, params: dict[str, Any]) -> tuple[str, Recipe]:
    study = optuna.create_study(directions=["maximize"])
    study.enqueue_trial(params)
    return space.decode(study.ask())  # type: ignore[no-any-return]


def test_the_ps_merge_is_a_donor_only_after_a_merge() -> None:
    assert donor_pool(POOL, Recipe(base="base")) == POOL
    assert donor_pool(POOL, PS) == [*POOL, MERGE_DONOR]
    env = _env({"layers": {"mode": "greedy"}})
    space = swap_space(Stage(2, "layer", "1"), PS, env)
    assert [label for label, _ in space.enqueue] == [*POOL, MERGE_DONOR]
    assert _decode(space, {"donor": MERGE_DONOR})[1] == PS  # keeping the merged layer: the incumbent itself
    assert _decode(space, {"donor": "a"})[1].layers == {1: "a"}
    swapped = PS.model_copy(update={"layers": {1: "a"}, "boundary": "b"})
    back = swap_space(Stage(3, "layer", "1"), swapped, env)
    assert _decode(back, {"donor": MERGE_DONOR})[1].layers == {1: MERGE_DONOR}
    assert (
        _decode(swap_space(Stage(3, "boundary"), swapped, env), {"donor": MERGE_DONOR})[1].boundary
        == MERGE_DONOR
    )
    assert _decode(swap_space(Stage(3, "boundary"), PS, env), {"donor": MERGE_DONOR})[1] == PS
    base_stage = swap_space(Stage(0, "base"), None, _env({"base": {"mode": "auto"}}, None))
    assert [label for label, _ in base_stage.enqueue] == POOL  # the base is a pool model
    plain = swap_space(Stage(2, "layer", "1"), Recipe(base="base"), _env({}, None))
    assert MERGE_DONOR not in [label for label, _ in plain.enqueue]


def test_keeping_a_slot_after_a_merge_keeps_the_merged_weights() -> None:
    adapter = ArchitectureAdapter("llama", 4, False)
    assert current_donor(PS, "layer.2", adapter) == MERGE_DONOR
    assert current_donor(PS, "unit.model.layers.2.mlp.down_proj", adapter) == MERGE_DONOR
    assert current_donor(PS, "unit.model.embed_tokens", adapter) == MERGE_DONOR
    swapped = PS.model_copy(update={"layers": {2: "a"}, "boundary": "b"})
    assert current_donor(swapped, "layer.2", adapter) == "a"
    assert current_donor(swapped, "unit.model.embed_tokens", adapter) == "b"
    assert current_donor(Recipe(base="base"), "layer.2", adapter) == "base"


def test_joint_layers_search_the_ps_merge_and_declare_it_up_front() -> None:
    env = _env({"layers": {"mode": "joint", "n_trials": 5, "warm_start": True}})
    stage = Stage(2, "joint-layers", n_trials=5)
    assert incumbent_of(stage, env.decisions) == PS
    space = joint_space(stage, PS, env)
    labels = [label for label, _ in space.enqueue]
    assert labels == ["incumbent", "all-base", "all-a", "all-b"]  # all-@merge is the incumbent point
    slots = [f"layer.{i}" for i in range(4)]
    assert space.enqueue[0][1] == dict.fromkeys(slots, MERGE_DONOR)
    _, kept = _decode(space, space.enqueue[0][1])
    assert kept.layers == dict.fromkeys(range(4), MERGE_DONOR) and kept.param_merge == PS.param_merge
    _, mixed = _decode(space, {**space.enqueue[0][1], "layer.1": "a"})
    assert mixed.layers[1] == "a" and mixed.layers[0] == MERGE_DONOR
    space_up_front = joint_distributions(stage, env)
    assert all(d.choices == (*POOL, MERGE_DONOR) for d in space_up_front.values())
    assert list(space_up_front) == slots
    no_merge = _env({"layers": {"mode": "joint"}}, None)
    assert all(MERGE_DONOR not in d.choices for d in joint_distributions(stage, no_merge).values())


def test_dfs_paths_may_run_through_the_ps_merge() -> None:
    env = _env({"dfs": {"mode": "joint", "repetitions": 1, "n_trials": 4}})
    stage = Stage(2, "joint-dfs", n_trials=4)
    space = dfs_space(stage, PS, env)
    assert [label for label, _ in space.enqueue] == ["identity:base", "identity:a", f"identity:{MERGE_DONOR}"]
    _, identity = _decode(space, space.enqueue[2][1])
    assert identity.dfs is not None and identity.param_merge == PS.param_merge
    assert identity.dfs.hops == tuple((MERGE_DONOR, i) for i in range(4))
    _, plain = _decode(space, space.enqueue[0][1])
    assert plain.param_merge is None and plain.dfs is not None  # a path without the merge does not carry it
    frames = dfs_distributions(stage, env)["io_model"]
    assert frames.choices == ("base", "a", MERGE_DONOR)  # type: ignore[attr-defined]
    identity.validate_against(POOL, 4, [])
    orphan = Recipe(
        base="base",
        dfs=DfsPath(hops=((MERGE_DONOR, 0),), scales=(1.0,), input_model="base", output_model="base"),
    )
    with pytest.raises(InputError, match="'@merge' names the parameter-space merge, but param_merge is not"):
        orphan.validate_against(POOL, 4, [])


# -- on the tiny zoo ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_merge_stage_then_layers_and_a_path_over_the_merge(tiny_zoo: Path, tmp_path: Path) -> None:
    """A campaign: merge, then a greedy layer stage offering ``@merge``, a joint layer stage searching it
    per layer, then a data-flow path over the merge. Keeping the merged layer costs nothing (its weights
    are the incumbent's: metrics reused), the identity path through the merge scores what the merged
    model scores, and a mixed recipe (layers from the merge and from pool models) and the winner export
    and rebuild bit for bit."""
    from olmopt.cli import main
    from tests.test_param_studies import export_and_rebuild, run, spec, weights

    decisions = {
        "merge": {"mode": "joint", "methods": ["task_arithmetic"], "n_trials": 2},
        "layers": {"mode": "greedy", "only": [1, 2, 3], "then_joint": 5, "warm_start": False},
        "dfs": {"mode": "joint", "repetitions": 1, "n_trials": 4},
    }
    data = spec(tiny_zoo, "psl", ["base", "spec_add", "spec_fact"], decisions)
    data["objectives"] = data["objectives"][:2]
    for objective in data["objectives"]:
        objective["samples"] = 20
    url, status = run(tmp_path, data)
    merge_decision = optuna.load_study(study_name="psl/001-joint-merge", storage=url).user_attrs[
        "olmopt.decision"
    ]
    merged = Recipe.from_json(merge_decision["recipe"])
    assert merged.param_merge is not None
    layer = optuna.load_study(study_name="psl/002-layer-1", storage=url)
    trials = {
        t.user_attrs["candidate"]: t for t in layer.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    }
    assert set(trials) == {str(tiny_zoo / m) for m in ("base", "spec_add", "spec_fact")} | {MERGE_DONOR}
    keep = trials[MERGE_DONOR]
    assert "reused" in keep.user_attrs  # the merged layer is the incumbent's: no evaluation
    assert keep.values == [merge_decision["metrics"][n] for n in ("add", "fact")]
    joint = optuna.load_study(study_name="psl/005-joint-layers", storage=url)
    mixed = [
        t for t in joint.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        if {MERGE_DONOR} < set(Recipe.from_json(t.user_attrs["recipe"]).layers.values())
    ]  # fmt: skip
    assert mixed  # sampled recipes that take some layers from the merge and others from pool models
    out, again = tmp_path / "mixed", tmp_path / "mixed-again"
    argv = [
        "export",
        "best",
        "psl",
        "--storage",
        url,
        "--stage",
        "005-joint-layers",
        "--trial",
        str(mixed[0].number),
    ]
    assert main([*argv, "--out", str(out), "--quiet", "--no-compare"]) == 0
    assert (
        main(
            [
                "rebuild",
                str(out / "merge_report.json"),
                "--out",
                str(again),
                "--quiet",
                "--models-dir",
                str(tiny_zoo),
            ]
        )
        == 0
    )
    a, b = weights(out), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    dfs = optuna.load_study(study_name="psl/006-joint-dfs", storage=url)
    identity = next(t for t in dfs.get_trials() if t.user_attrs.get("candidate") == f"identity:{MERGE_DONOR}")
    layer_winner = Recipe.from_json(layer.user_attrs["olmopt.decision"]["recipe"])
    assert layer_winner.param_merge == merged.param_merge
    assert identity.values == pytest.approx(keep.values, abs=1e-6)  # the path executor runs the merged model
    decided = layer.user_attrs["olmopt.decision"]
    if decided["winner"] == MERGE_DONOR:  # keeping the merged layer keeps the incumbent as it is
        assert decided["kept_incumbent"] and layer_winner == merged
    assert Recipe.from_dict(status["recipe"]).dfs is not None
    export_and_rebuild(tmp_path, url, "psl")  # the campaign's winner, bit for bit


def test_a_path_through_the_merge_exports_and_rebuilds_bit_exactly(tiny_zoo: Path, tmp_path: Path) -> None:
    from olmopt.export import rebuild, write_model_dir
    from olmopt.pool.model_pool import ModelPool
    from tests.test_param_studies import weights

    base, add, fact = (str(tiny_zoo / m) for m in ("base", "spec_add", "spec_fact"))
    pool = ModelPool([base, add, fact])
    merge = ParamMerge(
        method="ties",
        models=(add, fact),
        params={"density": 0.5},
        layer_params={"weights": ((1.0, 0.5), (0.2, 0.8))},
        group_size=2,
    )
    hops = ((base, 0), (MERGE_DONOR, 1), (MERGE_DONOR, 2), (add, 3), (MERGE_DONOR, 3))
    path = DfsPath(
        hops=hops, scales=(1.0, 0.9, 1.1, 1.0, 0.8), input_model=MERGE_DONOR, output_model=MERGE_DONOR
    )
    recipe = Recipe(base=base, param_merge=merge, dfs=path)
    out, again = tmp_path / "out", tmp_path / "again"
    write_model_dir(pool, recipe, out, {"recipe": recipe.to_dict()}, "card", progress=False)
    assert rebuild(out / "merge_report.json", again, progress=False) == recipe
    a, b = weights(out), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the frame and hops 1, 2 and 4 are the merged model's tensors (float32 export of the bf16/f32 merge)
    from olmopt.patch import materialize

    ps = dict(materialize(pool, Recipe(base=base, param_merge=merge), dtype=torch.float32))
    assert torch.equal(a["model.embed_tokens.weight"], ps["model.embed_tokens.weight"])
    assert torch.equal(
        a["model.layers.1.self_attn.q_proj.weight"], ps["model.layers.1.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        a["model.layers.3.self_attn.q_proj.weight"],
        pool.tensor(add, "model.layers.3.self_attn.q_proj.weight").float(),
    )
    assert torch.equal(
        a["model.layers.4.self_attn.q_proj.weight"], ps["model.layers.3.self_attn.q_proj.weight"]
    )
