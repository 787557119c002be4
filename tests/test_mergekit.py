"""mergekit interop: Recipe -> mergekit YAML -> Recipe gives the same weights; `olmopt merge mergekit`
evaluates gradient lists as mergekit does; what mergekit cannot express is said plainly; bad YAML is one
line naming the key, exit 2, nothing written."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file

from olmopt.cli import main
from olmopt.mergekit import (
    NotExpressible,
    evaluate_setting,
    mergekit_yaml,
    parse_mergekit,
    recipe_to_mergekit,
)
from olmopt.methods.delta import merge_tensor
from olmopt.patch import materialize
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import MERGE_DONOR, EsStep, ParamMerge, Recipe

MODELS = ("base", "spec_add", "spec_fact")


@pytest.fixture(scope="module")
def pool(tiny_zoo: Path) -> ModelPool:
    return ModelPool([str(tiny_zoo / m) for m in MODELS])


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def _recipes(pool: ModelPool) -> dict[str, Recipe]:
    base, add, fact = pool.names

    def ps(method: str, models: tuple[str, ...] = (add, fact), **kw: object) -> Recipe:
        return Recipe(base=base, param_merge=ParamMerge(method=method, models=models, **kw))  # type: ignore[arg-type]

    return {
        "ties-global": ps("ties", params={"weights": (0.7, 0.4), "density": (0.5, 0.9), "lambda": 0.8}),
        "dare-ties-layerwise": ps(
            "dare_ties",
            params={"lambda": 0.9},
            layer_params={"weights": ((1.0, 0.5), (0.2, 0.8)), "density": ((0.5, 0.6), 0.9)},
            group_size=2,
            seed=11,
        ),
        "ta-per-layer": ps(
            "task_arithmetic", layer_params={"weights": ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.3, 0.1))}
        ),
        "slerp-t-layerwise": ps("slerp", models=(add,), layer_params={"t": (0.1, 0.9)}, group_size=2),
        "linear-base-weight": ps("linear", params={"weights": (0.6, 0.3), "base_weight": 0.4}),
        "breadcrumbs": ps("breadcrumbs", params={"gamma": (0.05, 0.02), "density": 0.7}),
        "passthrough": Recipe(base=base, layers={1: add, 2: fact, 3: add}, boundary=None)
        .with_unit("model.norm", add)
        .with_unit("lm_head", add),
        "passthrough-boundary": Recipe(base=base, boundary=fact, layers={0: fact, 1: add, 3: fact}),
        "ps-kept-by-later-stages": ps("ties", params={"density": 0.5}).model_copy(
            update={"layers": {2: MERGE_DONOR}}
        ),
    }


@pytest.mark.parametrize(
    "label",
    [
        "ties-global",
        "dare-ties-layerwise",
        "ta-per-layer",
        "slerp-t-layerwise",
        "linear-base-weight",
        "breadcrumbs",
        "passthrough",
        "passthrough-boundary",
        "ps-kept-by-later-stages",
    ],
)
def test_recipe_yaml_recipe_round_trip_gives_the_same_weights(pool: ModelPool, label: str) -> None:
    recipe = _recipes(pool)[label]
    text = mergekit_yaml(recipe_to_mergekit(recipe, pool.adapter), recipe)
    data = yaml.safe_load(text)
    assert text.startswith("# mergekit configuration written by olmopt")
    again = parse_mergekit(data).build(pool.adapter)
    a, b = dict(materialize(pool, recipe)), dict(materialize(pool, again))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), label
    if label == "dare-ties-layerwise":
        assert [s["sources"][1]["layer_range"] for s in data["slices"]] == [[0, 2], [2, 4]]
        assert data["slices"][1]["sources"][1]["parameters"] == {"weight": 0.2, "density": 0.9}
        assert data["seed"] == 11 and again.param_merge.group_size == 2  # type: ignore[union-attr]
    if label == "ties-global":
        assert "models" in data and data["parameters"] == {"lambda": 0.8}
        assert again == recipe


@pytest.mark.parametrize(
    ("recipe", "reason"),
    [
        (
            Recipe(base="b", param_merge=ParamMerge(method="circuit", models=("a",))),
            "mergekit has no method circuit",
        ),
        (
            Recipe(base="b", units={"model.layers.1.mlp.up_proj": "a"}),
            "tensor model.layers.1.mlp.up_proj comes from a",
        ),
        (
            Recipe(base="b", es=(EsStep(unit="model.layers.0.mlp.up_proj", kind="svd", sigma=0.1, seed=1),)),
            "ES steps",
        ),
        (Recipe(base="b", boundary="a"), "the embedding comes from a but layer 0 from b"),
        (
            Recipe(base="b", layers={1: "a"}, param_merge=ParamMerge(method="ties", models=("a",))),
            "mixes a parameter-space merge",
        ),
        (
            Recipe(
                base="b",
                param_merge=ParamMerge(method="della", models=("a",), params={"sign_election": False}),
            ),
            "sign_election",
        ),
    ],
)
def test_what_mergekit_cannot_express_is_said(pool: ModelPool, recipe: Recipe, reason: str) -> None:
    with pytest.raises(NotExpressible, match=reason):
        recipe_to_mergekit(recipe, pool.adapter)


def test_gradients_evaluate_as_mergekit() -> None:
    assert evaluate_setting([0.0, 1.0, 0.5], 0.75, "k") == pytest.approx(0.75)
    assert (
        evaluate_setting([0.0, 1.0, 0.5], 0.0, "k") == 0.0
        and evaluate_setting([0.0, 1.0, 0.5], 1.0, "k") == 0.5
    )
    assert evaluate_setting([{"value": [1.0, 3.0]}], 0.5, "k") == 2.0
    assert evaluate_setting({"filter": "*", "value": 0.3}, 0.5, "k") == 0.3


def test_merge_mergekit_cli_applies_gradient_lists_per_layer(
    pool: ModelPool, tiny_zoo: Path, tmp_path: Path
) -> None:
    base, add, fact = pool.names
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": base},
            {"model": add, "parameters": {"weight": [1.0, 0.0], "density": 0.5}},
            {"model": fact, "parameters": {"weight": 0.5, "density": [0.2, 1.0]}},
        ],
        "parameters": {"normalize": False},
        "dtype": "bfloat16",
    }
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["merge", "mergekit", str(path), "--out", str(out), "--quiet"]) == 0
    merged = _weights(out)
    for layer in range(4):
        t = layer / 3
        name = f"model.layers.{layer}.self_attn.v_proj.weight"
        tensors = [pool.tensor(m, name) for m in pool.names]
        want = merge_tensor(
            "ties",
            tensors[0],
            tensors[1:],
            {"weights": (1.0 - t, 0.5), "density": (0.5, 0.2 + 0.8 * t), "normalize": False},
        )
        assert torch.equal(merged[name], want), layer
    # the embedding takes t = 0, the head t = 1 (mergekit's convention)
    head = [pool.tensor(m, "lm_head.weight") for m in pool.names]
    want = merge_tensor(
        "ties", head[0], head[1:], {"weights": (0.0, 0.5), "density": (0.5, 1.0), "normalize": False}
    )
    assert torch.equal(merged["lm_head.weight"], want)
    # the written report replays bit for bit
    again = tmp_path / "again"
    assert main(["rebuild", str(out / "merge_report.json"), "--out", str(again), "--quiet"]) == 0
    b = _weights(again)
    assert all(torch.equal(merged[k], b[k]) for k in merged)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: c.update(modulez=1), "modulez: unknown key"),
        (lambda c: c.update(modules={}), "modules: not supported by olmopt"),
        (
            lambda c: c.update(merge_method="frankenmerge"),
            "merge_method: unknown merge method 'frankenmerge'",
        ),
        (
            lambda c: c["models"][1].update(model="storage/nowhere/model"),
            "models[1].model: model storage/nowhere/model",
        ),
        (lambda c: c["models"][1].update(colour=3), "models[1].colour: unknown key"),
        (
            lambda c: c["models"][1]["parameters"].update(density=1.5),
            "models[1].parameters.density: ties: density must be in (0, 1], got 1.5",
        ),
        (
            lambda c: c["models"][1]["parameters"].update(density=[0.5, 1.5]),
            "models[1].parameters.density: ties: density must be in (0, 1]",
        ),
        (
            lambda c: c["models"][1]["parameters"].update(temperature=0.5),
            "models[1].parameters.temperature: method ties has no parameter",
        ),
        (
            lambda c: c.update(parameters={"weight": [{"filter": "self_attn", "value": 0.5}]}),
            "parameters.weight[0].filter: per-tensor filters",
        ),
        (lambda c: c.update(merge_method="slerp"), "merge_method: slerp: takes exactly 1 variant"),
        (lambda c: c.update(seed=-1), "seed: expected an integer"),
        (
            lambda c: c.update(out_dtype="float16"),
            "out_dtype: olmopt writes the base model's dtype (F32), got F16",
        ),
        (lambda c: c.update(out_dtype="int4"), "out_dtype: expected one of float32, bfloat16, float16"),
        (lambda c: c["models"].append({"model": c["models"][1]["model"]}), "models[3].model: "),
    ],
)
def test_bad_mergekit_yaml_is_one_line_exit_2_nothing_written(
    pool: ModelPool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change,
    fragment: str,  # noqa: ANN001
) -> None:
    base, add, fact = pool.names
    config = {
        "merge_method": "ties",
        "base_model": base,
        "models": [
            {"model": base},
            {"model": add, "parameters": {"weight": 1.0}},
            {"model": fact, "parameters": {"weight": 0.5}},
        ],
    }
    change(config)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert main(["merge", "mergekit", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and "\n" not in err, err
    assert str(path) in err
    assert not out.exists()


def test_slices_that_move_layers_are_refused(
    pool: ModelPool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, add, _ = pool.names
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]}]},
            {"sources": [{"model": add, "layer_range": [1, 4]}]},
        ],
    }
    path = tmp_path / "franken.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", "mergekit", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "slices[1].sources[0].layer_range: [1, 4] must start at layer 2" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_export_best_writes_mergekit_config_that_rebuilds_the_same_weights(
    tiny_zoo: Path, tmp_path: Path
) -> None:
    from tests.test_param_studies import run, spec

    data = spec(
        tiny_zoo,
        "mk",
        list(MODELS),
        {"merge": {"mode": "joint", "methods": ["ties"], "group_size": 2, "n_trials": 3}},
    )
    data["objectives"] = data["objectives"][:1]
    data["objectives"][0]["samples"] = 20
    url, _ = run(tmp_path, data)
    out, mk = tmp_path / "out", tmp_path / "winner.yml"
    args = [
        "export",
        "best",
        "mk",
        "--storage",
        url,
        "--out",
        str(out),
        "--quiet",
        "--no-compare",
        "--mergekit-config",
        str(mk),
    ]
    assert main(args) == 0
    config = yaml.safe_load(mk.read_text())
    assert config["merge_method"] == "ties" and "slices" in config
    assert config["dtype"] == "float32" and config["out_dtype"] == "float32"
    again = tmp_path / "again"
    assert main(["merge", "mergekit", str(mk), "--out", str(again), "--quiet"]) == 0
    a, b = _weights(out), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(optuna.load_study(study_name="mk/001-joint-merge", storage=url).trials[0].values[0])


@pytest.mark.slow
def test_export_best_says_when_mergekit_cannot(
    tiny_zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_param_studies import run, spec

    data = spec(
        tiny_zoo, "mkc", list(MODELS), {"merge": {"mode": "joint", "methods": ["circuit"], "n_trials": 1}}
    )
    data["objectives"] = data["objectives"][:1]
    data["objectives"][0]["samples"] = 10
    url, _ = run(tmp_path, data)
    mk = tmp_path / "winner.yml"
    args = [
        "export",
        "best",
        "mkc",
        "--storage",
        url,
        "--out",
        str(tmp_path / "out"),
        "--quiet",
        "--no-compare",
        "--mergekit-config",
        str(mk),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert (
        "mergekit config NOT written: mergekit cannot express this Recipe: mergekit has no method circuit"
        in err
    )
    assert (tmp_path / "out" / "merge_report.json").exists() and not mk.exists()
