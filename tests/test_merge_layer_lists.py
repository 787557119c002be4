"""Per-layer lists on ``olmopt merge METHOD``: ``--weights 0.2,0.8 0.5`` is mergekit's gradient (values
spread from the first layer to the last, linear in between), applied to the right layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from olmopt.cli import main
from olmopt.methods.delta import make_params, merge_tensor
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import ParamMerge, Recipe

LAYERS = 4


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layer-lists")
    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, vocab_size=50, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    paths = {}
    for name in ("A", "B", "C"):
        model.to(torch.bfloat16).save_pretrained(root / name)
        paths[name] = root / name
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return paths


def _merge(family: dict[str, Path], out: Path, method: str, *flags: str) -> dict[str, torch.Tensor]:
    argv = [
        "merge",
        method,
        str(family["A"]),
        str(family["B"]),
        str(family["C"]),
        "--out",
        str(out),
        "--quiet",
    ]
    assert main([*argv, *flags]) == 0
    return load_file(out / "model.safetensors")


def _layer(name: str) -> int:
    return ArchitectureAdapter("llama", LAYERS, False).merge_layer(name)


def test_gradients_give_each_layer_its_values(family: dict[str, Path], tmp_path: Path) -> None:
    merged = _merge(
        family, tmp_path / "ties", "ties", "--weights", "0.2,0.8", "0.5", "--density", "0.3,0.6,0.9,1.0"
    )
    record = json.loads((tmp_path / "ties" / "merge_config.json").read_text())
    # two points over four layers: 0.2 at layer 0, 0.8 at layer 3, linear in between; four points: one a layer
    weights = [w for w, _ in record["layer_params"]["weights"]]
    assert weights == pytest.approx([0.2, 0.4, 0.6, 0.8]) and {
        v for _, v in record["layer_params"]["weights"]
    } == {0.5}
    assert record["layer_params"]["density"] == [
        [d, d] for d in (0.3, 0.6, 0.9, 1.0)
    ]  # one list: every variant
    base, b, c = (load_file(family[n] / "model.safetensors") for n in "ABC")
    per_layer = [
        make_params(
            "ties",
            {
                "weights": tuple(record["layer_params"]["weights"][i]),
                "density": tuple(record["layer_params"]["density"][i]),
            },
        )
        for i in range(LAYERS)
    ]
    seen = set()
    for name, tensor in merged.items():
        layer = _layer(name)  # the embedding takes layer 0's values, the final norm and the head layer 3's
        seen.add(layer)
        assert torch.equal(
            tensor, merge_tensor("ties", base[name], [b[name], c[name]], per_layer[layer], 0, name)
        ), name
        if name.startswith("model.layers.0.mlp"):
            other = merge_tensor("ties", base[name], [b[name], c[name]], per_layer[3], 0, name)
            assert not torch.equal(tensor, other)  # the lists matter
    assert seen == set(range(LAYERS))
    one_thread = _merge(
        family, tmp_path / "ties-1", "ties", "--weights", "0.2,0.8", "0.5", "--density", "0.3,0.6,0.9,1.0",
        "--threads", "1",
    )  # fmt: skip
    assert all(torch.equal(one_thread[name], tensor) for name, tensor in merged.items())
    assert (
        _layer("model.embed_tokens.weight") == 0
        and _layer("lm_head.weight") == _layer("model.norm.weight") == 3
    )


def test_a_three_point_gradient_by_hand_and_the_same_merge_as_a_recipe(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """``--lambda 0,1,0`` over four layers: t = 0, 1/3, 2/3, 1 on three points -> 0, 2/3, 2/3, 0. The
    streamed merge and the Recipe with the same layer lists (export, rebuild) give the same bytes."""
    from olmopt.patch import materialize
    from olmopt.pool.model_pool import ModelPool

    merged = _merge(family, tmp_path / "ta", "task_arithmetic", "--lambda", "0,1,0", "--weights", "1", "0.5")
    record = json.loads((tmp_path / "ta" / "merge_config.json").read_text())
    assert record["layer_params"]["lambda"] == pytest.approx([0.0, 2 / 3, 2 / 3, 0.0])
    base = load_file(family["A"] / "model.safetensors")
    for name, tensor in merged.items():
        if _layer(name) in (0, 3):  # lambda 0: the base itself
            assert torch.equal(tensor, base[name]), name
        else:
            assert not torch.equal(tensor, base[name]), name
    a, b, c = (str(family[n]) for n in "ABC")
    merge = ParamMerge(
        method="task_arithmetic", models=(b, c), params={"weights": (1.0, 0.5)},
        layer_params={"lambda": tuple(record["layer_params"]["lambda"])},
    )  # fmt: skip
    recipe = Recipe(base=a, param_merge=merge)
    same = dict(materialize(ModelPool([a, b, c]), recipe))
    assert all(torch.equal(same[name], tensor) for name, tensor in merged.items())
    again = _merge(
        family,
        tmp_path / "circuit-cmd",
        "circuit",
        "--method",
        "task_arithmetic",
        "--lambda",
        "0,1,0",
        "--weights",
        "1",
        "0.5",
    )
    assert all(torch.equal(again[name], tensor) for name, tensor in merged.items())


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--density", "0.5,1.5"], "--density: ties: density must be in (0, 1], got 1.5"),
        (["--weights", "0.1,0.2", "0.3", "0.5"], "--weights has 3 values for 2 variants"),
        (["--weights", "0.1,x"], "expected a number or numbers separated by commas, got '0.1,x'"),
    ],
)
def test_bad_lists_are_one_line_exit_2_nothing_written(
    family: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    fragment: str,
) -> None:
    out = tmp_path / "bad"
    argv = ["merge", "ties", str(family["A"]), str(family["B"]), str(family["C"]), "--out", str(out), *flags]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a value that is not a number list itself
        code = int(str(exc.code))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err.splitlines()[-1], err
    assert not out.exists()
