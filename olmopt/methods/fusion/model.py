"""Depth fusion of a loaded Hugging Face model: apply a chain in place, or for a ``with`` block.

The chain (``olmopt.methods.fusion.maths``) folds the last decoder layer into the one before it, once
per alpha. ``fuse_model`` applies it in place to a Llama-family ``*ForCausalLM`` (Llama, Mistral,
Qwen2, Qwen3) and keeps the config consistent so ``save_pretrained`` -> ``from_pretrained``
round-trips; ``temporarily_fused`` applies it and restores the model exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from olmopt.errors import InputError, ModelError
from olmopt.methods.fusion.maths import check_chain, fuse_tail

#: The linear modules of a decoder layer that the chain fuses (weights and, when present, biases).
FUSED_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
#: Per-layer config lists other than ``*layer_types`` that transformers keeps (SmolLM3/Llama4 style).
PER_LAYER_CONFIG_KEYS = ("no_rope_layers",)

# ---------------------------------------------------------------------------------------------------
# Applying the chain to a model
# ---------------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Llama-family model (``model.model.layers``), checked for fusable modules."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"model {type(model).__name__}: no decoder layers at model.model.layers")
    for name in FUSED_LINEARS:
        if not isinstance(_submodule(layers[0], name), nn.Linear):
            raise ModelError(f"model {type(model).__name__}: decoder layers have no linear {name}")
    return layers


def _submodule(layer: nn.Module, dotted: str) -> nn.Module | None:
    module: Any = layer
    for part in dotted.split("."):
        module = getattr(module, part, None)
    return module


def validate_alphas(alphas: Sequence[Any], num_layers: int, source: str = "alphas") -> list[float]:
    """Check count and range of ``alphas`` for a ``num_layers`` model; returns them as floats."""
    if len(alphas) == 0:
        raise InputError(f"{source}: no fusion steps")
    try:
        check_chain(num_layers, len(alphas))
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    values: list[float] = []
    for i, alpha in enumerate(alphas):
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise InputError(f"{source}: step {i}: alpha must be a number, got {alpha!r}")
        if not (0.0 <= float(alpha) <= 1.0):
            raise InputError(f"{source}: step {i}: alpha {alpha} is outside [0, 1]")
        values.append(float(alpha))
    return values


def fuse_model(model: nn.Module, alphas: Sequence[float]) -> nn.Module:
    """Apply the fusion chain in place and return ``model``, ``len(alphas)`` layers shorter.

    The surviving layer's seven linear weights (and q/k/v/o/MLP biases where the architecture has
    them) become the closed-form combination of the folded layers, computed once in float32; its norms
    (input/post-attention, and Qwen3's q/k norms) stay those of the surviving layer, as in the seed.
    ``layer_idx`` attributes and the config's per-layer fields are updated.
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    values = validate_alphas(alphas, num_layers)
    survivor = num_layers - 1 - len(values)
    _write_fused(tail_tensors([layers[i] for i in range(survivor, num_layers)]), values)
    for _ in values:
        del layers[len(layers) - 1]
    _reindex_layers(layers)
    _update_config(model, num_layers, list(range(len(layers))))
    return model


@contextmanager
def temporarily_fused(model: nn.Module, alphas: Sequence[float]) -> Iterator[nn.Module]:
    """Fuse ``model`` in place for the ``with`` block, then restore it exactly (no deep copy).

    Only the surviving layer's fused tensors are saved and copied back; the dropped layers and the
    config fields that ``fuse_model`` edits are put back as they were.
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    values = validate_alphas(alphas, num_layers)
    survivor = num_layers - 1 - len(values)
    tensors = tail_tensors([layers[i] for i in range(survivor, num_layers)])
    saved = {name: ts[0].detach().clone() for name, ts in tensors.items()}
    config = model.config
    keys = [k for k in vars(config) if k.endswith("layer_types") or k in PER_LAYER_CONFIG_KEYS]
    config_saved = {
        k: getattr(config, k) for k in (*keys, "num_hidden_layers", "max_window_layers") if hasattr(config, k)
    }
    inner = getattr(model, "model", model)
    sliding_saved = getattr(inner, "has_sliding_layers", None)
    try:
        _write_fused(tensors, values)
        inner.layers = nn.ModuleList(list(layers)[: survivor + 1])
        _update_config(model, num_layers, list(range(survivor + 1)))
        yield model
    finally:
        inner.layers = layers
        for key, value in config_saved.items():
            setattr(config, key, value)
        if sliding_saved is not None:
            inner.has_sliding_layers = sliding_saved
        with torch.no_grad():
            for name, ts in tensors.items():
                ts[0].copy_(saved[name])


def _write_fused(tensors: dict[str, list[torch.Tensor]], alphas: list[float]) -> None:
    """Overwrite each surviving tensor with the closed-form fusion of its tail (one float32 sum)."""
    with torch.no_grad():
        for tail in tensors.values():
            tail[0].copy_(fuse_tail(tail, torch.tensor(alphas, dtype=torch.float32, device=tail[0].device)))


def tail_tensors(tail: Sequence[nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Fused tensor name (relative to a layer) -> that tensor in each of ``tail``'s layers."""
    out: dict[str, list[torch.Tensor]] = {}
    for linear in FUSED_LINEARS:
        modules = [_submodule(layer, linear) for layer in tail]
        for attr in ("weight", "bias"):
            present = [getattr(m, attr, None) is not None for m in modules]
            if not any(present):
                continue
            if not all(present):
                raise ModelError(f"{linear}.{attr} exists in some decoder layers but not others")
            out[f"{linear}.{attr}"] = [getattr(m, attr) for m in modules]
    return out


def _reindex_layers(layers: nn.ModuleList) -> None:
    """Set every ``layer_idx`` attribute (attention modules, KV cache slots) to the layer's position."""
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                cast(Any, module).layer_idx = index


def _update_config(model: nn.Module, old_count: int, kept: list[int]) -> None:
    """Make ``model.config`` describe the kept layers: count, per-layer lists, Qwen2 window layers."""
    config: Any = model.config
    for key, value in list(vars(config).items()):
        if not (key.endswith("layer_types") or key in PER_LAYER_CONFIG_KEYS) or value is None:
            continue
        if len(value) != old_count:
            raise ModelError(f"config {key} has {len(value)} entries for {old_count} layers")
        setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    window_layers = getattr(config, "max_window_layers", None)
    if isinstance(window_layers, int) and window_layers > len(kept):
        config.max_window_layers = len(kept)
    inner = getattr(model, "model", model)
    if hasattr(inner, "has_sliding_layers") and getattr(config, "layer_types", None) is not None:
        inner.has_sliding_layers = "sliding_attention" in config.layer_types
