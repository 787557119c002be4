"""DFS paths: mask decoding, the executor on resident layers, and the exact fold into a plain model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from olmopt.errors import InputError
from olmopt.methods.dfs.executor import DfsExecutor, classification_accuracy
from olmopt.methods.dfs.folded_model import build_exported_model, export_path, exported_config
from olmopt.methods.dfs.maths import (
    fold_into_output_projection,
    path_from_mask,
    rms_norm_fold_error_bound,
    stream_equivalent_eps,
    stream_ratios,
    validate_path,
)
from olmopt.methods.dfs.path import DfsPath, HopAffine

torch.set_num_threads(1)

HIDDEN, LAYERS, VOCAB = 64, 4, 101
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig, {}),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {"tie_word_embeddings": True}),
    "mistral": (MistralForCausalLM, MistralConfig, {}),
}


def tiny(cls, config_cls, seed: int, hidden: int = HIDDEN, **extra):  # type: ignore[no-untyped-def]
    """A random 4-layer model (GQA: 4 query heads, 2 kv heads); weights scaled up so norms matter."""
    torch.manual_seed(seed)
    config = config_cls(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        **extra,
    )
    model = cls(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.15)
    return model


def pair(arch: str):  # type: ignore[no-untyped-def]
    cls, config_cls, extra = ARCHS[arch]
    return tiny(cls, config_cls, 0, **extra), tiny(cls, config_cls, 1, **extra)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, 7:] = 0  # right padding
    mask[1, 7:] = 0
    return ids, mask


# a path that mixes models, reuses layer (0, 1) twice in a row and skips layers
MIXED_HOPS = ((0, 0), (1, 1), (0, 1), (0, 1), (1, 3), (0, 3))
MIXED_SCALES = (0.9, 1.3, 0.7, 1.0, 1.6, 0.8)


# ---------------------------------------------------------------------------- mask decoding


def test_path_from_mask_follows_the_seed_order_for_three_models() -> None:
    mask = np.zeros((2, 3, 4), dtype=bool)
    mask[0, 2, 0] = mask[0, 0, 3] = mask[0, 0, 1] = mask[1, 1, 2] = mask[1, 0, 0] = True
    scales = np.ones((2, 3, 4))
    scales[0, 0, 3] = 0.5
    scales[1, 1, 2] = 2.0
    path = path_from_mask(mask, scales, input_model=2, output_model=1)
    assert path.hops == ((0, 1), (0, 3), (2, 0), (0, 0), (1, 2))
    assert path.scales == (1.0, 0.5, 1.0, 1.0, 2.0)
    assert (path.input_model, path.output_model) == (2, 1)
    compact = path_from_mask(mask.tolist(), [1, 0.5, 1, 1, 2])
    assert compact.scales == path.scales


def test_append_last_layer_gets_its_scale_and_no_bias() -> None:
    mask = np.zeros((1, 2, 4), dtype=bool)
    mask[0, 0, :3] = True
    affine = [HopAffine(bias=torch.ones(HIDDEN)), None, None]
    path = path_from_mask(
        mask, None, affine=affine, layer_counts=[4, 4], append_last_layer=True, last_layer_scale=0.8
    )
    assert path.hops[-1] == (0, 3)
    assert path.scales[-1] == 0.8
    assert path.affine_at(3) is None  # the seed wrote last_layer_scale into the bias here


@pytest.mark.parametrize(
    ("mask", "scales", "layer_counts", "needle"),
    [
        (np.ones((2, 4), dtype=bool), None, None, "3 dimensions"),
        (np.zeros((1, 2, 4), dtype=bool), None, None, "empty"),
        (np.ones((1, 2, 4), dtype=bool), np.full((1, 2, 3), 1.0), None, "shape"),
        (np.ones((1, 3, 4), dtype=bool), None, [4, 4], "covers 3 models"),
        (np.ones((1, 2, 4), dtype=bool), None, [4, 2], "model 1 has only 2 layers"),
        (np.full((1, 1, 2), 2), None, None, "booleans"),
    ],
)
def test_bad_masks_are_one_line_input_errors(mask, scales, layer_counts, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError, match=needle) as info:
        path_from_mask(mask, scales, layer_counts=layer_counts)
    assert "\n" not in str(info.value)


def test_a_scale_for_an_inactive_slot_is_refused() -> None:
    mask = np.zeros((1, 2, 4), dtype=bool)
    mask[0, 0, :] = True
    scales = np.ones((1, 2, 4))
    scales[0, 1, 2] = 0.1
    with pytest.raises(InputError, match=r"scaling_factors\[0\]\[1\]\[2\].*inactive"):
        path_from_mask(mask, scales)


def test_path_json_round_trip_keeps_affine_maps() -> None:
    affine = (None, HopAffine(weight=torch.randn(HIDDEN, HIDDEN), bias=torch.randn(HIDDEN)), None)
    path = DfsPath(hops=((0, 0), (1, 2), (1, 2)), scales=(1.0, 0.5, 2.0), affine=affine, input_model=1)
    again = DfsPath.from_json(path.to_json())
    assert again.equals(path)
    assert not again.equals(DfsPath(hops=path.hops, scales=path.scales, input_model=1))
    assert DfsPath.from_json(DfsPath(hops=((0, 1),), scales=(3.0,)).to_json()).scales == (3.0,)
    with pytest.raises(InputError, match="unknown key"):
        DfsPath.from_dict({"hops": [[0, 0]], "scale": [1.0]})
    with pytest.raises(InputError, match="2 hops but 1 scales"):
        DfsPath(hops=((0, 0), (0, 1)), scales=(1.0,))


def test_one_path_type_names_models_in_a_recipe_and_indexes_them_to_run() -> None:
    scales = (1.0, 0.5, 2.0)
    named = DfsPath(hops=(("b", 0), ("a", 2), ("b", 3)), scales=scales, input_model="a", output_model="b")
    indexed = named.indexed(["a", "b", "c"])
    hops = ((1, 0), (0, 2), (1, 3))
    assert indexed == DfsPath(hops=hops, scales=scales, input_model=0, output_model=1)
    assert (indexed.input_index, indexed.output_index, indexed.hop_indices) == (0, 1, hops)
    assert indexed.indexed(["x"]) is indexed and not named.is_indexed and indexed.is_indexed
    assert named.renamed({"a": "/m/a"}).models_used == ["/m/a", "b"]
    assert named != indexed and hash(named) == hash(DfsPath.from_dict(named.to_dict()))
    with pytest.raises(InputError, match="model 'b' is not in the pool"):
        named.indexed(["a", "c"])
    with pytest.raises(InputError, match="names its models"):
        validate_path(named, [4, 4])
    with pytest.raises(InputError, match="mixes model names and model indices"):
        DfsPath(hops=(("a", 0),), scales=(1.0,), input_model=0, output_model="a")


def test_fold_into_output_projection_is_the_affine_of_the_output() -> None:
    gen = torch.Generator().manual_seed(3)
    down, bias = torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen).double()
    affine = HopAffine(
        weight=torch.randn(8, 8, generator=gen).double(), bias=torch.randn(8, generator=gen).double()
    )
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    weight2, bias2 = fold_into_output_projection(down, bias, 0.7, affine)
    expected = 0.7 * (x @ down.T + bias) @ affine.weight.T + affine.bias
    torch.testing.assert_close(x @ weight2.T + bias2, expected)
    weight3, bias3 = fold_into_output_projection(down, None, 2.0, None)
    assert bias3 is None
    torch.testing.assert_close(weight3, 2 * down)


# ---------------------------------------------------------------------------- executor


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_identity_path_reproduces_the_model_exactly(arch: str) -> None:
    a, b = pair(arch)
    ids, mask = batch()
    path = DfsPath(hops=tuple((0, i) for i in range(LAYERS)), scales=(1.0,) * LAYERS)
    with torch.no_grad():
        expected = a(input_ids=ids, attention_mask=mask).logits
        got = DfsExecutor([a, b], path)(ids, mask)
    assert torch.equal(got, expected)


def test_reused_layers_are_the_same_modules_and_add_no_parameters() -> None:
    a, b = pair("llama")
    path = DfsPath(hops=MIXED_HOPS, scales=MIXED_SCALES)
    executor = DfsExecutor([a, b], path)
    assert executor.layer_at(2) is executor.layer_at(3) is a.model.layers[1]
    weight = executor.layer_at(2).self_attn.q_proj.weight
    assert weight.data_ptr() == a.model.layers[1].self_attn.q_proj.weight.data_ptr()
    own = sum(p.numel() for p in a.parameters()) + sum(p.numel() for p in b.parameters())
    assert sum(p.numel() for p in executor.parameters()) == own
    before = {k: v.clone() for k, v in a.state_dict().items()}
    ids, mask = batch()
    with torch.no_grad():
        executor(ids, mask)
        build_exported_model([a, b], path)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_scales_act_on_the_branch_not_on_the_stream() -> None:
    a, _ = pair("llama")
    ids, mask = batch()
    plain = DfsPath(hops=tuple((0, i) for i in range(LAYERS)), scales=(1.0,) * LAYERS)
    scaled = DfsPath(hops=plain.hops, scales=(1.0, 1.0, 0.0, 1.0))  # drop layer 1's MLP output
    with torch.no_grad():
        ablated = LlamaForCausalLM(a.config).eval()
        ablated.load_state_dict(a.state_dict())
        ablated.model.layers[1].mlp.down_proj.weight.zero_()
        expected = ablated(input_ids=ids, attention_mask=mask).logits
        got = DfsExecutor([a], scaled)(ids, mask)
        assert not torch.allclose(got, DfsExecutor([a], plain)(ids, mask))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- export / fold


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exported_model_matches_the_executor(arch: str, tmp_path: Path) -> None:
    a, b = pair(arch)
    gen = torch.Generator().manual_seed(5)
    affine = tuple(
        HopAffine(weight=torch.eye(HIDDEN) + 0.1 * torch.randn(HIDDEN, HIDDEN, generator=gen))
        if k in (0, 2, 4)
        else None
        for k in range(len(MIXED_HOPS))
    )
    path = DfsPath(hops=MIXED_HOPS, scales=MIXED_SCALES, affine=affine, input_model=1, output_model=0)
    ids, mask = batch()
    with torch.no_grad():
        expected = DfsExecutor([a, b], path)(ids, mask)
    out = export_path([a, b], path, tmp_path / "out", sources=["a", "b"])
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(a)
    assert loaded.config.num_hidden_layers == len(MIXED_HOPS)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    if arch == "qwen2":
        assert loaded.config.layer_types == ["full_attention"] * len(MIXED_HOPS)
        assert loaded.config.tie_word_embeddings is False  # input model 1 != output model 0, embedding folded
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, a(input_ids=ids, attention_mask=mask).logits, atol=1e-3)
    record = json.loads((out / "dfs_path.json").read_text())
    assert DfsPath.from_dict(record["path"]).equals(path)
    assert record["sources"] == ["a", "b"]


def test_qwen2_keeps_tied_embeddings_when_nothing_touches_them(tmp_path: Path) -> None:
    a, b = pair("qwen2")
    path = DfsPath(hops=((0, 0), (1, 2), (0, 3)), scales=(1.0, 0.5, 1.2))
    out = export_path([a, b], path, tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())  # noqa: SIM118
    assert "lm_head.weight" not in names and len([n for n in names if ".layers.2." in n]) > 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.tie_word_embeddings is True
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            DfsExecutor([a, b], path)(ids, mask),
            rtol=1e-4,
            atol=1e-5,
        )
    scaled = DfsPath(hops=path.hops, scales=(0.5, 0.5, 1.2))
    assert exported_config([a, b], scaled).tie_word_embeddings is False


def test_affine_bias_folds_into_llama_mlp_bias_and_is_refused_elsewhere(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(9)
    bias = HopAffine(weight=torch.eye(HIDDEN), bias=0.3 * torch.randn(HIDDEN, generator=gen))
    path = DfsPath(hops=((0, 0), (1, 1), (0, 2)), scales=(1.0, 0.8, 1.1), affine=(bias, bias, None))
    a, b = pair("llama")
    ids, mask = batch()
    out = export_path([a, b], path, tmp_path / "llama")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.mlp_bias is True
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits,
            DfsExecutor([a, b], path)(ids, mask),
            rtol=1e-4,
            atol=1e-5,
        )
    for arch in ("qwen2", "mistral"):
        q, r = pair(arch)
        with pytest.raises(InputError, match="hop 1 has an affine bias") as info:
            export_path([q, r], path, tmp_path / arch)
        assert "\n" not in str(info.value)
        assert not (tmp_path / arch).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no temp dirs left behind


def test_stream_scaling_folds_into_cumulative_ratios_up_to_rmsnorm_eps() -> None:
    eps = 1e-2  # large on purpose so the eps effect is visible
    a = tiny(LlamaForCausalLM, LlamaConfig, 0, rms_norm_eps=eps)
    path = DfsPath(hops=((0, 0), (0, 1), (0, 1), (0, 3)), scales=(0.9, 1.2, 0.5, 1.5), scale_target="stream")
    ids, mask = batch()
    ratios = stream_ratios(path.scales)
    assert ratios == pytest.approx([1.0, 1.2, 0.6, 0.9])
    with torch.no_grad():
        expected = DfsExecutor([a], path)(ids, mask)
        folded = build_exported_model([a], path)
        plain_error = (folded(input_ids=ids, attention_mask=mask).logits - expected).abs().max().item()
        for k, layer in enumerate(folded.model.layers):
            layer.input_layernorm.variance_epsilon = stream_equivalent_eps(eps, ratios[k])
            layer.post_attention_layernorm.variance_epsilon = stream_equivalent_eps(eps, ratios[k])
        folded.model.norm.variance_epsilon = stream_equivalent_eps(eps, ratios[-1])
        corrected = folded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(corrected, expected, rtol=1e-4, atol=1e-5)  # exact once eps is rescaled
    assert plain_error > 1e-4  # the folded stack keeps one eps: a small, real difference
    assert rms_norm_fold_error_bound(1e-6, 0.5, 1.0) < 2e-6  # negligible at real eps and activations
    with pytest.raises(InputError, match="positive"):
        build_exported_model(
            [a], DfsPath(hops=path.hops, scales=(1.0, -1.0, 1.0, 1.0), scale_target="stream")
        )


def test_models_of_different_hidden_size_are_refused() -> None:
    a = tiny(LlamaForCausalLM, LlamaConfig, 0)
    c = tiny(LlamaForCausalLM, LlamaConfig, 2, hidden=32)
    path = DfsPath(hops=((0, 0), (1, 0)), scales=(1.0, 1.0))
    with pytest.raises(InputError, match="share one hidden size") as info:
        DfsExecutor([a, c], path)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="layer 7 of model 0"):
        DfsExecutor([a], DfsPath(hops=((0, 7),), scales=(1.0,)))
    with pytest.raises(InputError, match="empty"):
        DfsPath(hops=(), scales=())


# ---------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("cls", "config_cls"),
    [(LlamaForSequenceClassification, LlamaConfig), (MistralForSequenceClassification, MistralConfig)],
)
def test_classification_path_export_and_accuracy(cls, config_cls, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = tiny(cls, config_cls, 0, num_labels=3)
    b = tiny(cls, config_cls, 1, num_labels=3)
    ids, mask = batch()
    identity = DfsPath(
        hops=tuple((1, i) for i in range(LAYERS)), scales=(1.0,) * LAYERS, input_model=1, output_model=1
    )
    with torch.no_grad():
        assert torch.equal(
            DfsExecutor([a, b], identity)(ids, mask), b(input_ids=ids, attention_mask=mask).logits
        )
    path = DfsPath(
        hops=((0, 0), (1, 1), (1, 1), (0, 3)), scales=(1.1, 0.6, 1.4, 0.9), input_model=0, output_model=1
    )
    executor = DfsExecutor([a, b], path)
    with torch.no_grad():
        expected = executor(ids, mask)
    assert expected.shape == (2, 3)
    out = export_path([a, b], path, tmp_path / "cls")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(loaded) is cls and loaded.config.num_labels == 3
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5
        )

    def encode(text: str) -> list[int]:
        return [1 + ord(ch) % (VOCAB - 1) for ch in text]

    texts = ["a cat", "the dog barks", "zz", "hello there world", "ok", "merge me"]
    with torch.no_grad():
        predicted = [int(executor(torch.tensor([encode(t)])).argmax(-1)) for t in texts]
    dataset = [
        {"text": t, "label": p if i % 2 else (p + 1) % 3}
        for i, (t, p) in enumerate(zip(texts, predicted, strict=True))
    ]
    assert classification_accuracy(executor, encode, dataset, pad_token_id=0, batch_size=4) == pytest.approx(
        0.5
    )
    assert classification_accuracy(loaded, encode, dataset, pad_token_id=0, batch_size=3) == pytest.approx(
        0.5
    )
    with pytest.raises(InputError, match=r"dataset\[0\]"):
        classification_accuracy(executor, encode, [{"text": "x"}], pad_token_id=0)
