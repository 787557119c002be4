"""Depth fusion on tiny random models: fuse/save/reload, alphas files, MKA, gradient fit, the CLI."""

from __future__ import annotations

import copy
import json
import re
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from olmopt.cli import main
from olmopt.errors import InputError
from olmopt.methods.fusion.alphas_file import alphas_records, load_alphas, parse_alphas
from olmopt.methods.fusion.calibrate import calibration_loss, encode_calibration, fit_alphas, mka_alphas
from olmopt.methods.fusion.maths import fusion_coefficients
from olmopt.methods.fusion.model import fuse_model, temporarily_fused

torch.set_num_threads(1)

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
LINEARS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = string.digits + string.ascii_letters + string.punctuation + " \n"
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(chars))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = TEMPLATE
    return tok


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """hidden 64, 4 layers; Llama with all biases, Qwen2 with sliding layers 2-3, Mistral with a window."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=110,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True, mlp_bias=True))
    elif arch == "qwen2":
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=2)
        model = Qwen2ForCausalLM(config)
    else:
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=8))
    with torch.no_grad():  # make the norms differ per layer so "norms kept from W_keep" is observable
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.fill_(1.0 + 0.1 * i)
    return model.eval()


def _param(layer: torch.nn.Module, dotted: str) -> torch.Tensor:
    return layer.get_parameter(dotted)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])


# ---------------------------------------------------------------------------------------------------
# fuse_model
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_fused_model_round_trips_through_save_pretrained(arch: str, tmp_path: Path) -> None:
    original = tiny_model(arch)
    model = fuse_model(copy.deepcopy(original), [0.6, 0.3])
    layers = model.model.layers
    assert len(layers) == 2 and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1]
    if arch == "qwen2":
        assert model.config.layer_types == ["full_attention", "full_attention"]
        assert model.config.max_window_layers == 2
    # the survivor is the closed-form combination of original layers 1..3; its norms are layer 1's
    coefficients = fusion_coefficients(4, [0.6, 0.3])[1]
    names = [f"{lin}.{attr}" for lin in LINEARS for attr in ("weight", "bias")]
    names = [
        n
        for n in names
        if getattr(layers[1].get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) is not None
    ]
    assert len(names) == (14 if arch == "llama" else 10 if arch == "qwen2" else 7)
    for name in names:
        expected = sum(c * _param(original.model.layers[i], name) for i, c in coefficients.items())
        torch.testing.assert_close(_param(layers[1], name), expected)
    torch.testing.assert_close(
        layers[1].input_layernorm.weight, original.model.layers[1].input_layernorm.weight
    )
    torch.testing.assert_close(
        _param(layers[0], "mlp.up_proj.weight"), _param(original.model.layers[0], "mlp.up_proj.weight")
    )

    fused_logits = _logits(model, IDS)
    assert not torch.allclose(fused_logits, _logits(original, IDS))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2
    assert all(len(v) == 2 for k, v in saved.items() if k.endswith("layer_types") and v is not None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and len(reloaded.model.layers) == 2
    torch.testing.assert_close(_logits(reloaded, IDS), fused_logits)
    # the KV cache has one slot per remaining layer and greedy decoding with it matches the in-memory model
    out = model(input_ids=IDS, use_cache=True)
    assert len(out.past_key_values.layers) == 2
    generated = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(reloaded.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0), generated)


def test_alpha_one_is_plain_truncation() -> None:
    original = tiny_model("llama", seed=3)
    truncated = copy.deepcopy(original)
    del truncated.model.layers[2:]
    truncated.config.num_hidden_layers = 2
    fused = fuse_model(copy.deepcopy(original), [1.0, 1.0])
    torch.testing.assert_close(_logits(fused, IDS), _logits(truncated, IDS))


def test_fuse_model_rejects_bad_alphas() -> None:
    model = tiny_model("llama")
    with pytest.raises(InputError, match="4 fusion steps do not fit 4 layers"):
        fuse_model(model, [0.5] * 4)
    with pytest.raises(InputError, match=r"step 1: alpha 1.5 is outside \[0, 1\]"):
        fuse_model(model, [0.5, 1.5])
    assert len(model.model.layers) == 4  # nothing applied


# ---------------------------------------------------------------------------------------------------
# Alphas files
# ---------------------------------------------------------------------------------------------------

SEED_BASELINE = [  # fusion_alphas.json layout, with its negative step numbers, for a 6-layer model
    {
        "step": -4,
        "layer_to_merge_into": 4,
        "layer_to_remove": 5,
        "ratio_i_alpha": 0.6257765467,
        "ratio_j": 0.3742234533,
    },
    {
        "step": -3,
        "layer_to_merge_into": 3,
        "layer_to_remove": 4,
        "ratio_i_alpha": 0.6270365984,
        "ratio_j": 0.3729634016,
    },
]


def test_alphas_formats(tmp_path: Path) -> None:
    assert parse_alphas(SEED_BASELINE, num_layers=6) == [0.6257765467, 0.6270365984]
    assert parse_alphas(SEED_BASELINE) == [0.6257765467, 0.6270365984]  # pairs imply 6 layers
    optimized = [
        {k: v for k, v in e.items() if k != "ratio_j"} | {"step": i} for i, e in enumerate(SEED_BASELINE)
    ]
    assert parse_alphas(optimized, num_layers=6) == [0.6257765467, 0.6270365984]
    assert parse_alphas([0.4, 0.5, 1], num_layers=6) == [0.4, 0.5, 1.0]
    assert parse_alphas({"alphas": [0.4], "num_layers": 6}, num_layers=6) == [0.4]
    assert parse_alphas([0.4, 0.5, 0.6], num_layers=6, steps=2) == [0.4, 0.5]
    records = alphas_records(6, [0.25, 0.5])
    assert records[1] == {
        "step": 1,
        "layer_to_merge_into": 3,
        "layer_to_remove": 4,
        "ratio_i_alpha": 0.5,
        "ratio_j": 0.5,
    }
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    assert load_alphas(path, num_layers=6) == [0.25, 0.5]


@pytest.mark.parametrize(
    "data,num_layers,message",
    [
        ([0.5] * 4, 4, "4 fusion steps do not fit 4 layers"),
        ([], 4, "no fusion steps"),
        (SEED_BASELINE, 4, "step 0 fuses 4<-5, but on a 4-layer model step 0 must fuse 2<-3"),
        ([SEED_BASELINE[0], SEED_BASELINE[0]], None, "step 1 fuses 4<-5.*must fuse 3<-4"),
        ([0.5, -0.1], 4, r"step 1: alpha -0.1 is outside \[0, 1\]"),
        ([{"ratio_i_alpha": 0.6, "ratio_j": 0.6}], 4, "ratio_j 0.6 is not 1 - ratio_i_alpha"),
        ([{"ratio_i_alfa": 0.6}], 4, "unknown key 'ratio_i_alfa'"),
        ([{"step": 0}], 4, "missing 'ratio_i_alpha'"),
        (["0.5"], 4, "alpha must be a number"),
        ({"alphas": [0.5], "num_layers": 8}, 4, "written for 8 layers, the model has 4"),
        ({"weights": [0.5]}, 4, "an object must have an 'alphas' list"),
    ],
)
def test_alphas_validation_errors(data: object, num_layers: int | None, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        parse_alphas(data, "alphas file x.json", num_layers)
    assert str(info.value).startswith("alphas file x.json: ")


def test_load_alphas_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[0.5,")
    with pytest.raises(InputError, match=r"alphas file .*bad.json: invalid JSON at line 1"):
        load_alphas(bad, 4)
    with pytest.raises(InputError, match="missing.json does not exist"):
        load_alphas(tmp_path / "missing.json", 4)


# ---------------------------------------------------------------------------------------------------
# MKA baseline and gradient fit
# ---------------------------------------------------------------------------------------------------

TEXTS = [f"sample {i}: {'abcdefghij'[i % 10] * (3 + i % 5)} {i * 37 % 101}" for i in range(12)]


def test_mka_alphas_over_samples() -> None:
    model = tiny_model("qwen2", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alphas = mka_alphas(model, char_tokenizer(), TEXTS, steps=2, batch_size=5)
    assert len(alphas) == 2
    assert all(0.5 < a < 0.7311 for a in alphas)
    assert all(not layer._forward_hooks for layer in model.model.layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="needs at least 6 texts"):
        mka_alphas(model, char_tokenizer(), TEXTS[:3], steps=1)


def _calibration() -> list[dict]:
    mc = [
        {"question": f"which is larger? {a} or {b}", "choices": [str(a), str(b)], "answer": int(b > a)}
        for a, b in [(17, 42), (90, 3), (5, 61), (77, 12), (30, 31), (64, 8)]
    ]
    chat = [
        {"conversation": [{"from": "human", "value": f"rev {w}"}, {"from": "gpt", "value": w[::-1]}]}
        for w in ["abcd", "hello", "stone", "merge"]
    ]
    return mc + chat


def test_encode_calibration_scores_answer_tokens_and_the_letter() -> None:
    tok = char_tokenizer()
    encoded = encode_calibration(tok, _calibration())
    mc, chat = encoded[0], encoded[-1]
    assert len(mc.targets) == 1 and tok.convert_ids_to_tokens(mc.ids[mc.targets[0]]) == "B"
    assert tok.convert_ids_to_tokens([chat.ids[p] for p in chat.targets]) == [*"egrem", "</s>"]
    with pytest.raises(InputError, match="calibration item 0: 'answer' must be a choice index"):
        encode_calibration(tok, [{"question": "q", "choices": ["a", "b"], "answer": 2}])


def test_fit_alphas_lowers_the_calibration_loss() -> None:
    tok = char_tokenizer()
    model = tiny_model("llama", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _calibration()
    init = [0.5, 0.5]
    fitted = fit_alphas(model, tok, data, steps=2, init=init, lr=0.1, iterations=12, batch_size=16)
    assert len(fitted) == 2 and all(0.0 <= a <= 1.0 for a in fitted)
    assert fitted != init
    # the model is left as it was: same layers, weights, config and trainable flags
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    encoded = encode_calibration(tok, data)
    loss_init = calibration_loss(fuse_model(copy.deepcopy(model), init), encoded)
    loss_fit = calibration_loss(fuse_model(copy.deepcopy(model), fitted), encoded)
    assert loss_fit < loss_init - 1e-3


# ---------------------------------------------------------------------------------------------------
# CLI: olmopt merge fuse
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    path = tmp_path / "base"
    tiny_model("qwen2", seed=4).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_cli_fuse_writes_a_loadable_shorter_model(model_dir: Path, tmp_path: Path, capsys) -> None:
    alphas = tmp_path / "alphas.json"
    alphas.write_text(json.dumps(alphas_records(4, [0.7, 0.4, 0.2])))
    out = tmp_path / "fused"
    assert (
        main(
            [
                "merge",
                "fuse",
                str(model_dir),
                "--alphas",
                str(alphas),
                "--out",
                str(out),
                "--steps",
                "2",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_layers_before"] == 4 and summary["num_layers_after"] == 2
    assert summary["coefficients"]["1"] == pytest.approx({"1": 0.4, "2": 0.42, "3": 0.18})
    assert (out / "tokenizer.json").is_file()
    assert [r["ratio_i_alpha"] for r in json.loads((out / "fusion_alphas.json").read_text())] == [0.7, 0.4]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = fuse_model(AutoModelForCausalLM.from_pretrained(model_dir).eval(), [0.7, 0.4])
    torch.testing.assert_close(_logits(reloaded, IDS), _logits(expected, IDS))
    # an existing output is refused without --force and replaced with it
    assert main(["merge", "fuse", str(model_dir), "--alphas", str(alphas), "--out", str(out), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "fuse",
                str(model_dir),
                "--alphas",
                str(alphas),
                "--out",
                str(out),
                "--force",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == ""
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


@pytest.mark.parametrize(
    "content,message",
    [
        ([0.5, 0.5, 0.5, 0.5], "4 fusion steps do not fit 4 layers"),
        (SEED_BASELINE, "step 0 fuses 4<-5, but on a 4-layer model step 0 must fuse 2<-3"),
        ([0.5, 2.0], r"step 1: alpha 2.0 is outside \[0, 1\]"),
    ],
)
def test_cli_rejects_bad_alphas_in_one_line(
    model_dir: Path, tmp_path: Path, capsys, content, message
) -> None:
    alphas = tmp_path / "alphas.json"
    alphas.write_text(json.dumps(content))
    out = tmp_path / "out" / "fused"
    assert main(["merge", "fuse", str(model_dir), "--alphas", str(alphas), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("olmopt: error: alphas file ")
    assert str(alphas) in err
    assert re.search(message, err)
    assert not out.exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alphas.json", "base"]


def test_cli_rejects_a_missing_model(tmp_path: Path, capsys) -> None:
    alphas = tmp_path / "alphas.json"
    alphas.write_text("[0.5]")
    assert (
        main(["merge", "fuse", str(tmp_path / "nope"), "--alphas", str(alphas), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_temporarily_fused_matches_fuse_model_and_restores() -> None:
    model = tiny_model("qwen2", seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config_before = model.config.to_dict()
    original_logits = _logits(model, IDS)
    expected = _logits(fuse_model(copy.deepcopy(model), [0.3, 0.8, 0.5]), IDS)
    with temporarily_fused(model, [0.3, 0.8, 0.5]) as fused:
        assert len(fused.model.layers) == 1 and fused.config.layer_types == ["full_attention"]
        torch.testing.assert_close(_logits(fused, IDS), expected)
    assert model.config.to_dict() == config_before and len(model.model.layers) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(_logits(model, IDS), original_logits)


def test_differentiable_fused_loss_equals_the_fused_model_loss() -> None:
    from olmopt.methods.fusion.calibrate import _batch_loss, _fused_view
    from olmopt.methods.fusion.maths import fuse_tail
    from olmopt.methods.fusion.model import tail_tensors

    tok = char_tokenizer()
    model = tiny_model("llama", seed=6)
    encoded = encode_calibration(tok, _calibration())
    alphas = torch.tensor([0.2, 0.9], requires_grad=True)
    tails = tail_tensors(list(model.model.layers)[1:])
    with _fused_view(model, 1) as prefix:
        overrides = {f"{prefix}.1.{name}": fuse_tail(ts, alphas) for name, ts in tails.items()}
        loss = _batch_loss(model, encoded, overrides)
        (grad,) = torch.autograd.grad(loss, [alphas])
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    with temporarily_fused(model, [0.2, 0.9]) as fused:
        assert float(loss.detach()) == pytest.approx(
            calibration_loss(fused, encoded, batch_size=len(encoded)), rel=1e-5
        )
