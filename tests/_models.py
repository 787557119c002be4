"""Small random model families for unit tests that must not wait for the trained zoo."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '<|user|>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    chars = string.digits + string.ascii_letters + string.punctuation + " \n"
    vocab = {t: i for i, t in enumerate(SPECIALS + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = TEMPLATE
    return fast


def make_config(arch: str = "llama", layers: int = 4, hidden: int = 64, vocab: int = 102):
    extra = {}
    if arch == "mistral":
        extra["num_key_value_heads"] = 2
    if arch == "qwen2":
        extra["tie_word_embeddings"] = True
    return AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=extra.pop("num_key_value_heads", 4),
        intermediate_size=2 * hidden,
        vocab_size=vocab,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **extra,
    )


def make_family(
    root: Path, names: list[str], arch: str = "llama", layers: int = 4, noise: float = 0.5, seed: int = 0
) -> dict[str, Path]:
    """A base (first name) and noisy copies of it, saved as safetensors model directories."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(make_config(arch, layers, vocab=len(tok)))
    out = {}
    for k, name in enumerate(names):
        model = base if k == 0 else _noisy(base, noise, seed + k)
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


def _noisy(model, noise: float, seed: int):
    clone = AutoModelForCausalLM.from_config(model.config)
    clone.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise * (p.std() if p.numel() > 1 else 1.0))
    return clone


def damaged_copy(model_dir: Path, out: Path, unit: str, scale: float = 0.7) -> dict[str, torch.Tensor]:
    """Copy ``model_dir`` to ``out`` with ``unit``'s row norms
    scaled by exp(N(0, scale)) (seed 0); the new state."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    state = load_file(out / "model.safetensors")
    w = state[unit + ".weight"]
    rows = torch.exp(torch.randn(w.shape[0], 1, generator=torch.Generator().manual_seed(0)) * scale)
    state[unit + ".weight"] = (w.float() * rows).to(w.dtype).contiguous()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return state


def write_addition_data(path: Path, n: int = 12) -> Path:
    """A ShareGPT file of ``n`` doubling questions (``i+i=`` -> ``2i``) at ``path``."""
    data = [
        {"conversation": [{"from": "human", "value": f"{i}+{i}="}, {"from": "gpt", "value": str(2 * i)}]}
        for i in range(n)
    ]
    path.write_text(json.dumps(data))
    return path
