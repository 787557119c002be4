"""Parameter-space merge, depth-fusion and data-flow-path decisions as campaigns on the tiny zoo."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from olmopt.cli import main
from olmopt.config import StudyConfig
from olmopt.methods.dfs.path import DfsPath
from olmopt.recipe import Recipe
from olmopt.search.api import campaign_status
from olmopt.search.context import EvalContext
from olmopt.select import copeland, rank_table

REPO = Path(__file__).resolve().parents[1]


def spec(
    zoo: Path, name: str, models: list[str], decisions: dict, objectives: list[dict] | None = None
) -> dict:
    return {
        "name": name,
        "pool": {"models": [str(zoo / m) for m in models]},
        "objectives": objectives
        or [
            {
                "name": "add",
                "dataset": str(REPO / "objectives/add.json"),
                "metric": "token_accuracy",
                "samples": 60,
            },
            {
                "name": "fact",
                "dataset": str(REPO / "objectives/fact.json"),
                "metric": "token_accuracy",
                "samples": 60,
            },
            {
                "name": "mc",
                "dataset": str(REPO / "objectives/mc_choices.json"),
                "metric": "mc_accuracy",
                "samples": 60,
            },
        ],
        "decisions": {
            "base": {"mode": "fixed", "model": str(zoo / models[0])},
            "layers": {"mode": "off"},
            **decisions,
        },
    }


def run(tmp: Path, data: dict) -> tuple[str, dict]:
    url = f"sqlite:///{tmp}/{data['name']}.db"
    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", data["name"], "--storage", url, "--quiet"]) == 0
    return url, campaign_status(data["name"], url)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in directory.glob("*.safetensors") for k, v in load_file(f).items()}


def export_and_rebuild(tmp: Path, url: str, name: str) -> Path:
    out = tmp / f"{name}-out"
    assert main(["export", "best", name, "--storage", url, "--out", str(out), "--quiet", "--no-compare"]) == 0
    rebuilt = tmp / f"{name}-rebuilt"
    zoo = Path(__file__).resolve().parents[1] / "storage" / "zoo-tiny"  # the report names models by id
    argv = [
        "rebuild",
        str(out / "merge_report.json"),
        "--out",
        str(rebuilt),
        "--quiet",
        "--models-dir",
        str(zoo),
    ]
    assert main(argv) == 0
    a, b = weights(out), weights(rebuilt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out


@pytest.mark.slow
def test_merge_study_searches_methods_and_exports(tiny_zoo, tmp_path) -> None:
    data = spec(
        tiny_zoo,
        "merge",
        ["base", "spec_add", "spec_mc", "spec_fact"],
        {"merge": {"mode": "joint", "n_trials": 10}},
    )
    url, status = run(tmp_path, data)
    study = optuna.load_study(study_name="merge/001-joint-merge", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 10
    labels = {t.user_attrs["candidate"] for t in trials}
    assert {"task_arithmetic@1/n", "circuit@defaults"} <= labels
    assert {t.params["method"] for t in trials} >= {"task_arithmetic", "circuit"}
    recipe = Recipe.from_dict(status["recipe"])
    assert recipe.param_merge is not None
    out = export_and_rebuild(tmp_path, url, "merge")
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_fusion_study_compares_the_three_alpha_sources(tiny_zoo, tmp_path) -> None:
    objectives = [
        {
            "name": "mc",
            "dataset": str(REPO / "objectives/mc_choices.json"),
            "metric": "mc_accuracy",
            "samples": 60,
        },
        {"name": "ppl", "dataset": str(REPO / "objectives/add.json"), "metric": "perplexity", "samples": 60},
        {"name": "removed", "metric": "layers_removed"},
    ]
    data = spec(
        tiny_zoo,
        "fuse",
        ["base"],
        {"fusion": {"mode": "joint", "max_steps": 2, "n_trials": 8, "calibration_samples": 16}},
        objectives,
    )
    url, status = run(tmp_path, data)
    decision = optuna.load_study(study_name="fuse/001-joint-fusion", storage=url).user_attrs[
        "olmopt.decision"
    ]
    assert {"mka", "gradient"} <= set(decision["candidates"])
    for source in ("mka", "gradient"):
        cand = decision["candidates"][source]
        assert cand["metrics"]["removed"] == 2.0
        assert decision["winner"] == source or "held_out" in cand
    assert all(c["metrics"]["removed"] >= 1 for c in decision["candidates"].values())
    out = export_and_rebuild(tmp_path, url, "fuse")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 - len(Recipe.from_dict(status["recipe"]).fusion)


@pytest.mark.slow
def test_searched_dfs_path_beats_the_naive_stack(tiny_zoo, tmp_path) -> None:
    models = ["base", "spec_mc"]
    data = spec(tiny_zoo, "dfs", models, {"dfs": {"mode": "joint", "repetitions": 1, "n_trials": 16}})
    url, status = run(tmp_path, data)
    found = Recipe.from_dict(status["recipe"])
    assert found.dfs is not None
    a, b = (str(tiny_zoo / m) for m in models)
    naive = Recipe(
        base=a,
        dfs=DfsPath(
            hops=tuple([(a, i) for i in range(4)] + [(b, i) for i in range(4)]),
            scales=(1.0,) * 8,
            input_model=a,
            output_model=a,
        ),
    )
    config = StudyConfig.model_validate(dict(data, root=str(REPO)))
    ctx = EvalContext(config)
    directions = {o.name: o.direction for o in ctx.objectives}
    scores = {"found": ctx.score(found, "held_out"), "naive": ctx.score(naive, "held_out")}
    table = {o: {k: v[o] for k, v in scores.items()} for o in directions}
    cope = copeland(rank_table(table, directions))
    assert cope["found"] > cope["naive"], scores
    out = export_and_rebuild(tmp_path, url, "dfs")
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert exported.config.num_hidden_layers == len(found.dfs.hops)
    # the exported standard model gives the path executor's metrics
    from transformers import AutoTokenizer

    from olmopt.evaluate.engine import Evaluator

    values = Evaluator(exported, AutoTokenizer.from_pretrained(out), ctx.objectives).evaluate("held_out")
    for key, value in scores["found"].items():
        assert values[key] == pytest.approx(value, abs=1e-5)
    assert json.loads((out / "merge_report.json").read_text())["recipe"]["dfs"]
