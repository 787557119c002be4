"""The model pool: resolution errors, homology checks, lazy tensors, the LRU cache, tied heads, adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _models import char_tokenizer, make_config, make_family
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from olmopt.errors import InputError, ModelError
from olmopt.pool import checkpoint as checkpoint_module
from olmopt.pool.adapter import ArchitectureAdapter, unit_of
from olmopt.pool.checkpoint import Checkpoint
from olmopt.pool.model_pool import ModelPool

LAYER_UNITS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("llama"), ["a", "b"], "llama", layers=3)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("qwen2"), ["qa", "qb"], "qwen2", layers=3)


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    assert exc.value.exit_code == 2  # type: ignore[attr-defined]
    return text


def _save_model(path: Path, config: object) -> Path:
    """A real random model + the char tokenizer at ``path``."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


# -- resolution errors ------------------------------------------------------------------------------


def test_missing_directory_is_one_line_model_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelError) as exc:
        ModelPool([str(missing)])
    text = _one_line(exc)
    assert str(missing) in text and "no such directory" in text


def test_checkpoint_of_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"^model m: directory .* does not exist$"):
        Checkpoint(tmp_path / "gone", "m")


def test_uncached_hub_id_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time; mirror the environment for this test
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelError) as exc:
        ModelPool(["olmopt-test-org/no-such-model"])
    text = _one_line(exc)
    assert text.startswith("model olmopt-test-org/no-such-model: cannot fetch from the hub")
    assert "HF_HUB_OFFLINE" in text


def test_pickle_only_weights_refused(tmp_path: Path, llama: dict[str, Path]) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama["a"] / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not even a pickle: must never be opened")
    with pytest.raises(ModelError) as exc:
        ModelPool([str(pickled)])
    text = _one_line(exc)
    assert str(pickled) in text and "pytorch_model.bin" in text and "safetensors" in text


def test_directory_without_weights(tmp_path: Path, llama: dict[str, Path]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(llama["a"] / "config.json", empty / "config.json")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        ModelPool([str(empty)])


def test_duplicate_and_empty_pools() -> None:
    with pytest.raises(ModelError, match="empty"):
        ModelPool([])
    with pytest.raises(ModelError, match="twice"):
        ModelPool(["x", "x"])


def test_unknown_member_names_the_pool(llama: dict[str, Path]) -> None:
    pool = ModelPool([str(llama["a"])])
    with pytest.raises(ModelError, match=r"model 'zzz' is not in the pool"):
        pool["zzz"]


# -- homology -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "change", "expected"),
    [
        ("num_hidden_layers", {"layers": 2}, "3 != 2"),
        ("hidden_size", {"hidden": 32}, "64 != 32"),
        ("num_attention_heads", {"heads": 8}, "4 != 8"),
        ("vocab_size", {"vocab": 110}, "102 != 110"),
    ],
)
def test_homology_mismatch_names_both_models_and_field(
    tmp_path: Path, llama: dict[str, Path], field: str, change: dict[str, int], expected: str
) -> None:
    config = make_config("llama", change.get("layers", 3), change.get("hidden", 64), change.get("vocab", 102))
    if "heads" in change:
        config.num_attention_heads = config.num_key_value_heads = change["heads"]
    other = _save_model(tmp_path / "other", config)
    pool = ModelPool([str(llama["a"]), str(other)])
    with pytest.raises(ModelError) as exc:
        pool.check_homology()
    text = _one_line(exc)
    assert str(llama["a"]) in text and str(other) in text
    assert f"not homologous: {field} {expected}" in text


def test_architecture_mismatch(llama: dict[str, Path], qwen2: dict[str, Path]) -> None:
    pool = ModelPool([str(llama["a"]), str(qwen2["qa"])])
    with pytest.raises(ModelError) as exc:
        pool.check_homology()
    text = _one_line(exc)
    assert str(llama["a"]) in text and str(qwen2["qa"]) in text
    assert "model_type 'llama' != 'qwen2'" in text


def test_tokenizer_vocabulary_mismatch(tmp_path: Path, llama: dict[str, Path]) -> None:
    other = tmp_path / "swapped"
    shutil.copytree(llama["b"], other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["x"], vocab["y"] = vocab["y"], vocab["x"]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(data))
    pool = ModelPool([str(llama["a"]), str(other)])
    with pytest.raises(ModelError) as exc:
        pool.check_homology()
    text = _one_line(exc)
    assert str(llama["a"]) in text and str(other) in text
    assert "tokenizer vocabularies differ" in text and "'x'" in text


def test_homologous_family_passes(llama: dict[str, Path]) -> None:
    pool = ModelPool([str(p) for p in llama.values()])
    pool.check_homology()
    assert pool.adapter.num_layers == 3


# -- lazy tensors and the cache -------------------------------------------------------------------


def test_checkpoint_reads_exactly_one_tensor(monkeypatch: pytest.MonkeyPatch, llama: dict[str, Path]) -> None:
    reads: list[str] = []
    real_safe_open = checkpoint_module.safe_open

    class CountingHandle:
        def __init__(self, handle: object) -> None:
            self._h = handle

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self._h.get_tensor(name)  # type: ignore[attr-defined]

        def __getattr__(self, attr: str) -> object:
            return getattr(self._h, attr)

        def __enter__(self) -> CountingHandle:
            self._h.__enter__()  # type: ignore[attr-defined]
            return self

        def __exit__(self, *args: object) -> None:
            self._h.__exit__(*args)  # type: ignore[attr-defined]

    monkeypatch.setattr(
        checkpoint_module, "safe_open", lambda *a, **k: CountingHandle(real_safe_open(*a, **k))
    )
    ckpt = Checkpoint(llama["b"], "b")
    assert reads == []  # indexing reads names only
    name = "model.layers.1.mlp.up_proj.weight"
    got = ckpt.get(name)
    assert reads == [name]
    full = load_file(str(llama["b"] / "model.safetensors"))
    assert torch.equal(got, full[name])
    assert set(ckpt.keys()) == set(full)
    assert ckpt.shape(name) == tuple(full[name].shape) and ckpt.dtype_name(name) == "F32"
    with pytest.raises(ModelError, match="has no tensor 'nope'"):
        ckpt.get("nope")


def test_sharded_checkpoint(tmp_path: Path, llama: dict[str, Path]) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama["a"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ckpt = Checkpoint(tmp_path / "sharded")
    state = model.state_dict()
    assert len({ckpt._file_of[k] for k in ckpt}) > 1
    for name in ckpt:
        assert torch.equal(ckpt.get(name), state[name])


def test_lru_cache_is_byte_bounded(llama: dict[str, Path]) -> None:
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]  # 128 x 64 float32 = 32 KiB each
    size = 128 * 64 * 4
    pool = ModelPool([str(llama["a"])], cache_bytes=2 * size)
    a, b, c = names
    first = pool.tensor(str(llama["a"]), a)
    assert pool.tensor(str(llama["a"]), a) is first  # cache hit returns the same tensor
    pool.tensor(str(llama["a"]), b)
    pool.tensor(str(llama["a"]), a)  # a is now the most recently used
    pool.tensor(str(llama["a"]), c)  # evicts b (least recently used), not a
    cached = [k[1] for k in pool._cache]
    assert cached == [a, c]
    assert pool._cache_bytes == 2 * size <= pool.cache_limit
    assert pool.tensor(str(llama["a"]), a) is first
    big = "model.embed_tokens.weight"  # 102 x 64 x 4 = 26112 bytes: fits; then shrink the limit
    pool.cache_limit = 1000
    pool.tensor(str(llama["a"]), big)
    assert big not in [k[1] for k in pool._cache]  # larger than the limit: returned, never cached


def test_tied_embeddings_head_is_the_embedding(qwen2: dict[str, Path]) -> None:
    pool = ModelPool([str(p) for p in qwen2.values()])
    pool.check_homology()
    name = str(qwen2["qb"])
    assert "lm_head.weight" not in pool[name].checkpoint
    head = pool.tensor(name, "lm_head.weight")
    assert torch.equal(head, pool.tensor(name, "model.embed_tokens.weight"))
    model = AutoModelForCausalLM.from_pretrained(qwen2["qb"])
    assert torch.equal(head, model.get_output_embeddings().weight)
    assert pool.adapter.tied_embeddings
    assert pool.adapter.boundary_units() == ("model.embed_tokens", "model.norm")


# -- adapter ------------------------------------------------------------------------------------------


def test_adapter_units_llama(llama: dict[str, Path]) -> None:
    config = AutoConfig.from_pretrained(llama["a"])
    adapter = ArchitectureAdapter.from_config(config)
    params = [n for n, _ in AutoModelForCausalLM.from_config(config).named_parameters()]
    assert adapter.layer_units(params, 1) == [f"model.layers.1.{u}" for u in LAYER_UNITS]
    assert adapter.boundary_units() == ("model.embed_tokens", "model.norm", "lm_head")
    units = adapter.all_units(params)
    assert units[0] == "model.embed_tokens" and units[-2:] == ["model.norm", "lm_head"]
    assert len(units) == 3 + 3 * len(LAYER_UNITS)
    assert adapter.layer_of("model.layers.2.mlp.down_proj.weight") == 2
    assert adapter.layer_of("model.layers.12.input_layernorm.weight") == 12
    assert adapter.layer_of("model.norm.weight") is None
    assert adapter.layer_of("lm_head.weight") is None
    assert adapter.is_boundary("lm_head.weight") and not adapter.is_boundary(
        "model.layers.0.mlp.up_proj.weight"
    )
    assert adapter.storage_name("lm_head.weight") == "lm_head.weight"


def test_adapter_units_qwen2_group_biases(qwen2: dict[str, Path]) -> None:
    config = AutoConfig.from_pretrained(qwen2["qa"])
    adapter = ArchitectureAdapter.from_config(config)
    params = [n for n, _ in AutoModelForCausalLM.from_config(config).named_parameters()]
    layer_params = [p for p in params if p.startswith("model.layers.0.")]
    assert len(layer_params) == len(LAYER_UNITS) + 3  # q, k, v biases
    assert adapter.layer_units(params, 0) == [f"model.layers.0.{u}" for u in LAYER_UNITS]
    assert unit_of("model.layers.0.self_attn.q_proj.bias") == "model.layers.0.self_attn.q_proj"
    assert unit_of("model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj"
    assert "lm_head" not in adapter.all_units([*params, "lm_head.weight"])
    assert adapter.storage_name("lm_head.weight") == "model.embed_tokens.weight"


def test_unsupported_architecture() -> None:
    config = AutoConfig.for_model("gpt2", n_layer=2)
    with pytest.raises(ModelError, match=r"^model m: architecture 'gpt2' is not supported") as exc:
        ArchitectureAdapter.from_config(config, "m")
    assert isinstance(exc.value, InputError)


def test_expected_tensors_are_kept_per_config_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama: dict[str, Path]
) -> None:
    monkeypatch.setenv("OLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint_module, "expected_from_table", lambda path: None)  # as if not listed
    Checkpoint(llama["a"]).check_complete()  # builds the model on the meta device, stores the result
    stored = json.loads(next((tmp_path / "cache" / "expected-tensors").glob("*.json")).read_text())
    assert stored["shapes"]["model.norm.weight"] == [make_config("llama", layers=3).hidden_size]

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stored expectation should have been used")

    monkeypatch.setattr(checkpoint_module, "expected_tensors", no_build)
    partial = tmp_path / "partial"
    shutil.copytree(llama["a"], partial)
    weights = load_file(partial / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lacks tensor 'model.norm.weight'"):
        Checkpoint(partial).check_complete()  # same config.json: from disk, still checked
    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(AssertionError, match="stored expectation"):
        Checkpoint(partial).check_complete()  # another config.json: built again


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("llama", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True, "head_dim": 32}),
        ("mistral", {"num_key_value_heads": 2}),
        ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
        ("qwen2", {}),
    ],
)
def test_architecture_table_gives_transformers_state_dict(arch: str, extra: dict[str, object]) -> None:
    """The table of pool.architectures (no transformers import) equals the meta-device model's state dict."""
    from olmopt.pool.architectures import decoder_state_dict

    config = AutoConfig.for_model(
        arch, hidden_size=64, intermediate_size=172, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=103, **extra,
    )  # fmt: skip
    config.architectures = [{"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch] + "ForCausalLM"]
    found = decoder_state_dict(json.loads(config.to_json_string()))
    built = checkpoint_module.expected_tensors(config)
    assert found is not None and built is not None
    shapes, tied = found
    assert shapes == built.shapes
    assert (frozenset({"lm_head.weight"}) if tied else frozenset()) == built.optional
    assert built.prefix == "model"


def test_architecture_table_checks_without_building_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, llama: dict[str, Path]
) -> None:
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("a listed architecture should not build its model")

    monkeypatch.setenv("OLMOPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint_module, "expected_tensors", no_build)
    Checkpoint(llama["a"]).check_complete()
    partial = tmp_path / "partial"
    shutil.copytree(llama["a"], partial)
    weights = load_file(partial / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="'model.layers.1.mlp.up_proj.weight' has shape"):
        Checkpoint(partial).check_complete()
    config = json.loads((partial / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**config, "architectures": ["OtherForCausalLM"]}))
    with pytest.raises(AssertionError, match="should not build"):
        Checkpoint(partial).check_complete()  # not listed: built on the meta device
