"""``olmopt merge circuit`` end to end: streaming merge of small Llama dirs, loading, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from olmopt.cli import main
from olmopt.methods.delta import make_params
from olmopt.methods.delta.stream import merge_directories

torch.set_num_threads(1)


def _config(**overrides: int) -> LlamaConfig:
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        vocab_size=100,
        max_position_embeddings=64,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def _save(model: LlamaForCausalLM, path: Path) -> Path:
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    base = LlamaForCausalLM(_config())
    paths = {"A": _save(base, root / "A")}
    for name in ("B", "C"):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn_like(p))
        paths[name] = _save(base, root / name)
    paths["wide"] = _save(LlamaForCausalLM(_config(intermediate_size=96)), root / "wide")
    partial = root / "partial"
    _save(LlamaForCausalLM(_config()), partial)
    state = load_file(partial / "model.safetensors")
    state.pop("model.norm.weight")
    from safetensors.torch import save_file

    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    paths["partial"] = partial
    return paths


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 2]])).logits


@pytest.mark.parametrize("method", ["circuit", "della", "task_arithmetic"])
def test_merged_dir_loads_and_gives_finite_logits(
    family: dict[str, Path], tmp_path: Path, method: str, capsys
) -> None:
    out = tmp_path / "merged"
    args = ["merge", "circuit", str(family["A"]), str(family["B"]), str(family["C"]), "--out", str(out)]
    assert main([*args, "--method", method, "--json", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tensors"] == 21 and summary["method"] == method
    assert torch.isfinite(_logits(out)).all()
    record = json.loads((out / "merge_config.json").read_text())
    assert record["method"] == method and record["seed"] == 3
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    merged = load_file(out / "model.safetensors")
    base = load_file(family["A"] / "model.safetensors")
    assert all(merged[k].dtype == torch.bfloat16 for k in merged)
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert len(changed) == len(merged)


def test_output_identical_across_threads_and_shards(family: dict[str, Path], tmp_path: Path) -> None:
    params = make_params("circuit", {"temperature": 0.3})
    variants = [family["B"], family["C"]]
    one = merge_directories(
        family["A"], variants, tmp_path / "one", "circuit", params, 5, threads=1, progress=False
    )
    merge_directories(
        family["A"], variants, tmp_path / "two", "circuit", params, 5, threads=2, progress=False
    )
    sharded = merge_directories(
        family["A"],
        variants,
        tmp_path / "sharded",
        "circuit",
        params,
        5,
        progress=False,
        max_shard_bytes=60_000,
    )
    assert one["shards"] == 1 and sharded["shards"] > 2
    a = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "two" / "model.safetensors").read_bytes()
    torch.testing.assert_close(_logits(tmp_path / "sharded"), _logits(tmp_path / "one"), rtol=0, atol=0)


def test_yaml_config_in_seed_layout(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "from_yaml"
    config = {
        "base_model": str(family["A"]),
        "variant_models": [{"model": str(family["B"])}, {"model": str(family["C"])}],
        "output_dir": str(out),
        "parameters": {
            "temperature": 0.2,
            "base_droprate": 0.6,
            "meaningful_change_threshold": 1e-6,
            "seed": 42,
        },
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config))
    assert main(["merge", "circuit", "--config", str(path), "--quiet"]) == 0
    record = json.loads((out / "merge_config.json").read_text())
    assert record["seed"] == 42
    assert record["params"]["temperature"] == 0.2 and record["params"]["base_droprate"] == 0.6
    assert record["params"]["threshold"] == 1e-6


def _fails_cleanly(argv: list[str], out: Path, capsys, fragment: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_input_exits_2_with_one_line_and_no_output(
    family: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "bad"
    base = ["merge", "circuit", str(family["A"])]
    _fails_cleanly([*base, str(family["wide"]), "--out", str(out)], out, capsys, "intermediate_size")
    _fails_cleanly([*base, str(family["partial"]), "--out", str(out)], out, capsys, "model.norm.weight")
    _fails_cleanly([*base, str(tmp_path / "nope"), "--out", str(out)], out, capsys, "does not exist")
    _fails_cleanly(
        [*base, str(family["B"]), "--out", str(out), "--base-droprate", "1.0"], out, capsys, "base_droprate"
    )
    _fails_cleanly(
        [*base, str(family["B"]), "--out", str(out), "--temperature", "-0.1"], out, capsys, "temperature"
    )
    _fails_cleanly(
        [*base, str(family["B"]), "--out", str(out), "--method", "della", "--temperature", "0.5"],
        out,
        capsys,
        "temperature",
    )


def test_base_lacking_a_variant_tensor_is_named(family: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "bad"
    argv = ["merge", "circuit", str(family["partial"]), str(family["A"]), "--out", str(out)]
    _fails_cleanly(argv, out, capsys, "lacks tensor 'model.norm.weight'")


def test_existing_output_needs_force(family: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    argv = ["merge", "circuit", str(family["A"]), str(family["B"]), "--out", str(out), "--quiet"]
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    assert (out / "model.safetensors").is_file()
