"""The checkpoint tensors of common decoder architectures, as data: names and shapes from config.json alone.

Building a model on the meta device (``checkpoint.expected_tensors``) imports transformers and the
architecture's modules, about 3-4 CPU s: most of a streaming merge's start-up. For the architectures
listed here the same state dict follows from a few config.json keys, so ``Checkpoint.check_complete``
reads it from this table first and builds the model only for other architectures.
``tests/test_architectures.py`` checks every entry against transformers' own state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DecoderLayout:
    """What distinguishes a Llama-style decoder's checkpoint: biases on the attention projections."""

    qkv_bias: bool | None  # None: the config's ``attention_bias`` decides (q, k, v and o)
    mlp_bias_key: bool  # the config's ``mlp_bias`` adds biases to gate, up and down


LAYOUTS: dict[tuple[str, str], DecoderLayout] = {
    ("llama", "LlamaForCausalLM"): DecoderLayout(qkv_bias=None, mlp_bias_key=True),
    ("mistral", "MistralForCausalLM"): DecoderLayout(qkv_bias=False, mlp_bias_key=False),
    ("qwen2", "Qwen2ForCausalLM"): DecoderLayout(qkv_bias=True, mlp_bias_key=False),
}
REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def decoder_state_dict(config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], bool] | None:
    """(tensor name -> shape, lm_head tied to the embeddings) of a listed architecture's config.json,
    None when the config is not one of them or lacks a key the shapes need."""
    archs = config.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1:
        return None
    layout = LAYOUTS.get((str(config.get("model_type")), str(archs[0])))
    if layout is None or not all(isinstance(config.get(k), int) for k in REQUIRED):
        return None
    hidden, inter, heads, layers, vocab = (int(config[k]) for k in REQUIRED)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        return None
    attn_bias = bool(config.get("attention_bias", False)) if layout.qkv_bias is None else layout.qkv_bias
    out_bias = layout.qkv_bias is None and attn_bias
    mlp_bias = layout.mlp_bias_key and bool(config.get("mlp_bias", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj, (rows, cols) in {"q": (q, hidden), "k": (kv, hidden), "v": (kv, hidden)}.items():
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (rows, cols)
            if attn_bias:
                shapes[f"{p}self_attn.{proj}_proj.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, q)
        if out_bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (hidden,)
        for proj, (rows, cols) in {
            "gate": (inter, hidden),
            "up": (inter, hidden),
            "down": (hidden, inter),
        }.items():
            shapes[f"{p}mlp.{proj}_proj.weight"] = (rows, cols)
            if mlp_bias:
                shapes[f"{p}mlp.{proj}_proj.bias"] = (rows,)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes, bool(config.get("tie_word_embeddings", False))
