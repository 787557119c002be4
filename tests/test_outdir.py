"""Atomic output directories, the sharded safetensors writer and side-file copying."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from olmopt.errors import InputError
from olmopt.outdir import ShardedSafetensorsWriter, atomic_output_dir, copy_side_files, save_state_dict

torch.set_num_threads(1)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_atomic_dir_appears_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not out.exists()
        (tmp / "a.txt").write_text("x")
    assert (out / "a.txt").read_text() == "x"
    assert _leftovers(tmp_path) == ["model"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_removed_on_error(tmp_path: Path, error: type[BaseException]) -> None:
    out = tmp_path / "model"
    with pytest.raises(error), atomic_output_dir(out) as tmp:
        (tmp / "partial.bin").write_bytes(b"123")
        raise error()
    assert _leftovers(tmp_path) == []


def test_atomic_dir_refuses_existing_unless_force(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(InputError, match="already exists"), atomic_output_dir(out):
        pass
    assert (out / "old.txt").exists()
    with pytest.raises(ValueError), atomic_output_dir(out, force=True) as tmp:  # failure keeps the old dir
        (tmp / "new.txt").write_text("new")
        raise ValueError
    assert _leftovers(out) == ["old.txt"]
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _leftovers(out) == ["new.txt"]
    assert _leftovers(tmp_path) == ["model"]


def _state(n: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    state = {f"layer.{i}.weight": torch.randn(10, 20, generator=gen).to(torch.bfloat16) for i in range(n)}
    state["ids"] = torch.arange(7, dtype=torch.int64)
    state["scale"] = torch.tensor(2.5)
    return state


@pytest.mark.parametrize("planned", [False, True])
def test_sharded_writer_splits_and_indexes(tmp_path: Path, planned: bool) -> None:
    state = _state()
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()] if planned else None
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=1_000, plan=plan)
    for name in reversed(list(state)) if planned else state:  # planned writers take any order
        writer.add(name, state[name])
    shards = writer.close()
    assert len(shards) == 3 and shards[0].name == "model-00001-of-00003.safetensors"  # 2+2+3 tensors
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(shard)
        assert all(index["weight_map"][k] == shard.name for k in part)
        loaded.update(part)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not list(tmp_path.glob("part-*"))


def test_single_shard_is_model_safetensors(tmp_path: Path) -> None:
    shards = save_state_dict(_state(2), tmp_path)
    assert [s.name for s in shards] == ["model.safetensors"]
    assert set(load_file(shards[0])) == set(_state(2))


def test_planned_writer_rejects_surprises(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, plan=[("a", torch.float32, (2,)), ("b", torch.float32, (2,))])
    with pytest.raises(InputError, match="planned"):
        writer.add("a", torch.zeros(3))
    writer.add("b", torch.zeros(2))
    with pytest.raises(InputError, match="twice"):
        writer.add("b", torch.zeros(2))
    with pytest.raises(InputError, match="never written"):
        writer.close()


def test_multishard_state_dict_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config).eval()
    config.save_pretrained(tmp_path)
    shards = save_state_dict(model.state_dict(), tmp_path, max_shard_bytes=20_000)
    assert len(shards) > 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_copy_side_files_skips_weights_and_hidden(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    names = [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "vocab.json",
        "merges.txt",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        ".hidden",
        "README.md",
    ]
    for name in names:
        (src / name).write_text(name)
    copied = copy_side_files(src, dst)
    assert sorted(copied) == sorted(names[:8])
    assert _leftovers(dst) == sorted(names[:8])
