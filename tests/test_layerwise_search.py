"""The layer-wise ``merge`` decision: dimensions per model and layer group, decoding into layer-wise
Recipes, the enqueued known-good points, the Borda scalarisation fed to CMA-ES, and a real stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from olmopt.cli import main
from olmopt.config import StudyConfig
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import Recipe
from olmopt.search.kinds.merge import BordaCmaEs, borda, merge_sampler, merge_space
from olmopt.search.kinds.swap import donor_pool
from olmopt.search.plan import Stage
from olmopt.search.seeding import TrialSeeded
from olmopt.testing.kinds import NamesEnv

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _config(**merge: Any) -> StudyConfig:
    return StudyConfig.model_validate(
        {
            "name": "t",
            "pool": {"models": ["base", "a", "b"]},
            "objectives": [{"dataset": "x.json", "metric": "token_accuracy"}],
            "decisions": {"merge": {"mode": "joint", **merge}},
        }
    )


def _space(**merge: Any):  # noqa: ANN202 - a StageSpace
    env = NamesEnv(_config(**merge), ["base", "a", "b"])
    return merge_space(Stage(index=1, kind="joint-merge", n_trials=5), Recipe(base="base"), env)


def _decode(space, params: dict[str, Any]) -> Recipe:  # noqa: ANN001
    study = optuna.create_study(directions=["maximize"])
    study.enqueue_trial(params)
    _, recipe = space.decode(study.ask())
    return recipe


def test_default_is_the_global_setting() -> None:
    for space in (
        _space(methods=["ties"]),
        _space(methods=["ties"], group_size=4),
        _space(methods=["ties"], group_size=9),
    ):
        label, point = space.enqueue[0]
        assert label == "ties@defaults"
        assert set(point) == {
            "method",
            "ties.weights.0",
            "ties.weights.1",
            "ties.density.0",
            "ties.density.1",
        }
        recipe = _decode(space, point)
        assert recipe.param_merge is not None and recipe.param_merge.layer_params == {}
        assert recipe.param_merge.params == {"weights": (1.0, 1.0), "density": (1.0, 1.0)}


def test_layerwise_dimensions_decode_into_layer_params() -> None:
    space = _space(methods=["ties"], group_size=2)
    point = dict(space.enqueue[0][1])
    names = sorted(k for k in point if k != "method")
    assert names == sorted(
        f"ties.{p}.{i}.g{g}" for p in ("weights", "density") for i in (0, 1) for g in (0, 1)
    )
    point.update({"ties.weights.0.g1": 0.25, "ties.density.1.g0": 0.5})
    merge = _decode(space, point).param_merge
    assert merge is not None and merge.group_size == 2 and merge.params == {}
    assert merge.layer_params == {"weights": ((1.0, 1.0), (0.25, 1.0)), "density": ((1.0, 0.5), (1.0, 1.0))}
    assert merge.params_at(3) == {"weights": (0.25, 1.0), "density": (1.0, 1.0)}
    merge.check_layers(4)


def test_per_layer_groups_and_methods_without_layerwise_parameters() -> None:
    space = _space(methods=["task_arithmetic", "slerp", "circuit"], models=["a"], group_size=1)
    labels = {label: point for label, point in space.enqueue}
    ta = labels["task_arithmetic@1/n"]
    # task arithmetic at 1/n: every per-layer weight at 1, lambda = 1/n
    assert ta == {
        "method": "task_arithmetic",
        "task_arithmetic.lambda": 1.0,
        **{f"task_arithmetic.weights.0.g{g}": 1.0 for g in range(4)},
    }
    merge = _decode(space, ta).param_merge
    assert merge is not None and merge.layer_params == {"weights": ((1.0,), (1.0,), (1.0,), (1.0,))}
    # slerp's t and circuit's knobs are not per variant: global as before
    assert _decode(space, labels["slerp@defaults"]).param_merge.layer_params == {}
    assert "circuit.temperature" in labels["circuit@defaults"]


def test_only_listed_parameters_are_layerwise() -> None:
    point = dict(_space(methods=["ties"], group_size=2, layerwise=["density"]).enqueue[0][1])
    assert "ties.weights.0" in point and "ties.density.0.g1" in point and "ties.weights.0.g0" not in point


def test_borda_scalarisation_by_hand() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in ([0.5, 3.0], [0.7, 3.0], [0.5, 1.0], [0.9, 9.0]):
        study.add_trial(optuna.trial.create_trial(values=values))
    infeasible = optuna.trial.create_trial(values=[1.0, 0.0], constraints={"c.add": 0.5})
    study.add_trial(infeasible)
    scores = borda(study.trials, study.directions)
    # objective 1 (max): ranks 4, 2, 4, 1 (and 0.9 > ... the infeasible 1.0 is best: 1); objective 2 (min)
    # values 3, 3, 1, 9, 0 -> ranks 3, 3, 2, 5, 1
    assert scores[0] == (1 + 3) + (1 + 2)
    assert scores[1] == (1 + 2) + (1 + 2)
    assert scores[2] == (1 + 3) + (1 + 1)
    assert scores[3] == (1 + 1) + (1 + 4)
    assert scores[4] == 1 + 1 + 2 * 6  # infeasible: after every feasible trial


def test_cmaes_steers_on_the_borda_count_of_a_multi_objective_study() -> None:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trial.suggest_categorical("method", ["ties"])
        x = [trial.suggest_float(f"ties.weights.{i}.g0", 0.0, 1.0) for i in range(3)]
        return -sum((v - 0.8) ** 2 for v in x), -abs(x[0] - 0.8)

    sampler = TrialSeeded(BordaCmaEs(seed=3, population_size=6), 3)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.optimize(objective, n_trials=60)
    generations = {t.system_attrs.get("cma:generation") for t in study.trials}
    assert max(g for g in generations if g is not None) >= 5  # CMA-ES sampled (no random fallback)
    first = sum(t.values[0] for t in study.trials[:12]) / 12
    last = sum(t.values[0] for t in study.trials[-12:]) / 12
    assert last > first + 0.05
    # a resumed run (a new sampler) asks the same next point as the uninterrupted one
    a = TrialSeeded(BordaCmaEs(seed=3, population_size=6), 3)
    b = TrialSeeded(BordaCmaEs(seed=3, population_size=6), 3)
    pa = optuna.create_study(directions=["maximize", "maximize"], sampler=a)
    for t in study.trials:
        pa.add_trial(t)
    pb = optuna.create_study(directions=["maximize", "maximize"], sampler=b)
    for t in study.trials:
        pb.add_trial(t)
    ta, tb = pa.ask(), pb.ask()
    ta.suggest_categorical("method", ["ties"])
    tb.suggest_categorical("method", ["ties"])
    assert [ta.suggest_float(f"ties.weights.{i}.g0", 0.0, 1.0) for i in range(3)] == [
        tb.suggest_float(f"ties.weights.{i}.g0", 0.0, 1.0) for i in range(3)
    ]


def test_sampler_choice() -> None:
    assert merge_sampler(_config(), 0) is None
    assert isinstance(merge_sampler(_config(sampler="cmaes", methods=["ties"]), 0).inner, BordaCmaEs)  # type: ignore[union-attr]
    assert isinstance(merge_sampler(_config(sampler="gp"), 0).inner, optuna.samplers.GPSampler)  # type: ignore[union-attr]
    assert isinstance(merge_sampler(_config(sampler="tpe"), 0).inner, optuna.samplers.TPESampler)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("merge", "fragment"),
    [
        ({"sampler": "cmaes", "methods": ["ties", "dare_ties"]}, "sampler cmaes searches one method"),
        ({"group_size": 0}, "decisions.merge.group_size"),
        ({"sampler": "nsga"}, "decisions.merge.sampler"),
    ],
)
def test_bad_merge_settings_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], merge: dict, fragment: str
) -> None:
    data = {
        "name": "bad",
        "pool": {"models": ["storage/zoo-tiny/base", "storage/zoo-tiny/spec_add"]},
        "objectives": [{"dataset": "objectives/add.json", "metric": "token_accuracy"}],
        "decisions": {"merge": {"mode": "joint", **merge}},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "create", str(path), "--storage", f"sqlite:///{tmp_path}/x.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err
    assert not (tmp_path / "x.db").exists()


@pytest.mark.slow
def test_layerwise_cmaes_stage_exports_and_rebuilds(tiny_zoo: Path, tmp_path: Path) -> None:
    from tests.test_param_studies import export_and_rebuild, run, spec

    data = spec(
        tiny_zoo,
        "lw",
        ["base", "spec_add", "spec_fact"],
        {
            "merge": {
                "mode": "joint",
                "methods": ["task_arithmetic"],
                "group_size": 2,
                "sampler": "cmaes",
                "n_trials": 6,
            }
        },
    )
    data["objectives"] = data["objectives"][:2]
    for o in data["objectives"]:
        o["samples"] = 20
    data["sampler"] = {"population_size": 4}
    add, fact = (str(tiny_zoo / m) for m in ("spec_add", "spec_fact"))
    mk = {
        "merge_method": "task_arithmetic",
        "base_model": str(tiny_zoo / "base"),
        "models": [
            {"model": add, "parameters": {"weight": 0.5}},
            {"model": fact, "parameters": {"weight": 0.25}},
        ],
        "parameters": {"lambda": 0.8},
    }
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(mk))
    data["decisions"]["merge"]["enqueue"] = [str(tmp_path / "mk.yml")]
    url, status = run(tmp_path, data)
    study = optuna.load_study(study_name="lw/001-joint-merge", storage=url)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 6 and all(len(t.values) == 2 for t in trials)
    assert trials[0].user_attrs["candidate"] == "task_arithmetic@1/n"
    assert trials[1].user_attrs["candidate"] == "mk.yml".join(("mergekit:", ""))
    enqueued = Recipe.from_json(trials[1].user_attrs["recipe"]).param_merge
    assert enqueued is not None and enqueued.params["lambda"] == 0.8
    assert enqueued.layer_params["weights"] == ((0.5, 0.25), (0.5, 0.25))
    assert any("cma:generation" in t.system_attrs for t in trials[1:])
    recipe = Recipe.from_dict(status["recipe"])
    merge = recipe.param_merge
    assert merge is not None and merge.group_size == 2 and len(merge.layer_params["weights"]) == 2
    assert math.isclose(merge.params["lambda"], merge.params["lambda"])
    export_and_rebuild(tmp_path, url, "lw")


def test_donor_pool_offers_the_ps_merge_after_a_merge_stage() -> None:
    from olmopt.recipe import MERGE_DONOR, ParamMerge

    assert donor_pool(["base", "a"], Recipe(base="base")) == ["base", "a"]
    ps = Recipe(base="base", param_merge=ParamMerge(method="ties", models=("a",)))
    assert donor_pool(["base", "a"], ps) == ["base", "a", MERGE_DONOR]


def _space_with(tmp_path: Path, configs: list[dict], **merge: Any):  # noqa: ANN202 - a StageSpace
    paths = []
    for i, config in enumerate(configs):
        path = tmp_path / f"mk{i}.yml"
        path.write_text(yaml.safe_dump(config))
        paths.append(str(path))
    env = NamesEnv(_config(enqueue=paths, **merge), ["base", "a", "b"])
    return merge_space(Stage(index=1, kind="joint-merge", n_trials=5), Recipe(base="base"), env)


def _ties(**slices_or_models: Any) -> dict:
    return {"merge_method": "ties", "base_model": "base", **slices_or_models}


def test_mergekit_configs_are_enqueued_as_points_of_the_stage(tmp_path: Path) -> None:
    from olmopt.mergekit import parse_mergekit

    glob = _ties(
        models=[
            {"model": "a", "parameters": {"weight": 0.3, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.6}},
        ]
    )
    per_pair = _ties(
        slices=[
            {
                "sources": [
                    {"model": "base", "layer_range": [a, a + 2]},
                    *(
                        {"model": m, "layer_range": [a, a + 2], "parameters": {"weight": w, "density": 0.8}}
                        for m, w in (("a", 0.1 + 0.2 * a), ("b", 0.2))
                    ),
                ]
            }
            for a in (0, 2)
        ]
    )
    space = _space_with(tmp_path, [glob], methods=["ties", "task_arithmetic"])
    label, point = space.enqueue[1]
    assert label == "mergekit:mk0.yml"
    assert point == {
        "method": "ties",
        "ties.weights.0": 0.3,
        "ties.weights.1": 0.6,
        "ties.density.0": 0.5,
        "ties.density.1": 1.0,
    }
    space = _space_with(tmp_path, [per_pair], methods=["ties"], group_size=2)
    label, point = space.enqueue[0]
    merge = _decode(space, point).param_merge
    want = (
        parse_mergekit(yaml.safe_load((tmp_path / "mk0.yml").read_text()))
        .build(ArchitectureAdapter("llama", 4, False))
        .param_merge
    )
    assert merge is not None and want is not None and merge.group_size == 2 and want.group_size == 2
    from olmopt.methods.delta import make_params

    for layer in range(4):
        assert make_params("ties", merge.params_at(layer)).resolve(2) == make_params(
            "ties", want.params_at(layer)
        ).resolve(2)


@pytest.mark.parametrize(
    ("config", "merge", "fragment"),
    [
        (
            _ties(models=[{"model": "a", "parameters": {"weight": [0.1, 0.9]}}, {"model": "b"}]),
            {"group_size": 2},
            "weights on layer 1 is (0.3666",
        ),
        (
            _ties(models=[{"model": "a"}, {"model": "b"}], parameters={"lambda": 0.5}),
            {},
            "lambda on layer 0 is 0.5",
        ),
        (_ties(models=[{"model": "a"}, {"model": "c"}]), {}, "models[1].model: model c is not in the pool"),
        (
            {
                "merge_method": "slerp",
                "base_model": "base",
                "models": [{"model": "a"}],
                "parameters": {"t": 0.5},
            },
            {},
            "method slerp is not in decisions.merge.methods",
        ),
        (_ties(models=[{"model": "b"}, {"model": "a"}]), {}, "list the models in the stage's order"),
        (_ties(models=[{"model": "a"}, {"model": "b"}], colour=1), {}, "colour: unknown key"),
    ],
)
def test_mergekit_configs_the_stage_cannot_represent_are_one_line(
    tmp_path: Path, config: dict, merge: dict, fragment: str
) -> None:
    from olmopt.errors import InputError

    with pytest.raises(InputError, match=None) as info:
        _space_with(tmp_path, [config], methods=["ties"], **merge)
    message = str(info.value)
    assert (
        message.startswith("decisions.merge.enqueue[0]: ") and fragment in message and "\n" not in message
    ), message
