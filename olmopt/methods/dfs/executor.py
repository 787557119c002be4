"""Run a data-flow-space (DFS) path on resident models (teacher-forced), and score a classifier.

``DfsExecutor(models, path)`` runs a ``DfsPath`` directly on the models' own decoder layers (a layer
used by several hops is the same module, never copied) and returns logits like the HF forward:
``(batch, seq, vocab)`` for causal LMs, ``(batch, num_labels)`` for sequence classification
(last non-pad token pooling, as transformers does). The export of a path as a plain model is
``olmopt.methods.dfs.folded_model``. Semantics: docs/dfs.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from olmopt.errors import InputError
from olmopt.methods.dfs.maths import affine_transform, validate_path
from olmopt.methods.dfs.path import DfsPath
from olmopt.runtime import cache_kwarg

# ----------------------------------------------------------------------------------------------
# model structure helpers


# transformers models are read by submodule and config names (``base_model.layers``, ``config.layer_types``),
# which torch types as ``Tensor | Module``: these helpers take and give ``Any``


def base_of(model: Any) -> Any:
    return model.base_model


def is_classifier(model: Any) -> bool:
    return isinstance(getattr(model, "score", None), nn.Linear)


def head_of(model: Any) -> Any:
    if is_classifier(model):
        return model.score
    head = model.get_output_embeddings()
    if head is None:
        raise InputError(f"{type(model).__name__}: no lm_head or score head to produce logits")
    return head


def check_structure(models: Sequence[PreTrainedModel]) -> None:
    if not models:
        raise InputError("a DFS path needs at least one model")
    for i, model in enumerate(models):
        base = getattr(model, "base_model", None)
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, n)]
        if missing:
            raise InputError(
                f"model {i} ({type(model).__name__}): unsupported layout, missing {', '.join(missing)} "
                "(supported: Llama-family decoder stacks)"
            )


def _attention_kind(config: Any, layer: int) -> str:
    """``full_attention`` or ``sliding_attention`` for one layer, as the model's forward picks it."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


# ----------------------------------------------------------------------------------------------
# executor


class DfsExecutor(nn.Module):
    """Run a ``DfsPath`` on resident models. ``forward(input_ids, attention_mask) -> logits``.

    The models are registered as submodules (so ``.to()`` moves them) but never copied or changed;
    affine maps are kept as non-persistent buffers. Teacher-forced only (no KV cache).
    """

    def __init__(self, models: Sequence[PreTrainedModel], path: DfsPath) -> None:
        super().__init__()
        check_structure(models)
        validate_path(
            path,
            [len(base_of(m).layers) for m in models],
            [int(m.config.hidden_size) for m in models],
        )
        self.models = nn.ModuleList(models)
        self.path = path
        self.classification = is_classifier(models[path.output_index])
        head_of(models[path.output_index])  # raises when the output model has no head
        for k in range(path.num_hops):
            affine = path.affine_at(k)
            self.register_buffer(
                f"affine_weight_{k}", None if affine is None else affine.weight, persistent=False
            )
            self.register_buffer(
                f"affine_bias_{k}", None if affine is None else affine.bias, persistent=False
            )

    def layer_at(self, hop: int) -> nn.Module:
        """The decoder layer module hop ``hop`` runs (the model's own object)."""
        m, layer = self.path.hop_indices[hop]
        return base_of(self.models[m]).layers[layer]

    def _transform(self, value: torch.Tensor, hop: int) -> torch.Tensor:
        if self.path.is_identity_at(hop):
            return value
        weight, bias = getattr(self, f"affine_weight_{hop}"), getattr(self, f"affine_bias_{hop}")
        return affine_transform(value, self.path.scales[hop], weight, bias)

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The output model's final-norm output, ``(batch, seq, hidden)``."""
        path = self.path
        embeds = base_of(self.models[path.input_index]).embed_tokens(input_ids)
        position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
        masks: dict[tuple[int, str], Any] = {}
        rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def layer_kwargs(m: int, layer: int) -> dict[str, Any]:
            config = self.models[m].config
            kind = _attention_kind(config, layer)
            if (m, kind) not in masks:
                make = (
                    create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
                )
                masks[(m, kind)] = make(
                    config=config,
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    **{cache_kwarg(make): None},
                )
            if m not in rope:
                rope[m] = base_of(self.models[m]).rotary_emb(embeds, position_ids=position_ids)
            return {
                "attention_mask": masks[(m, kind)],
                "position_ids": position_ids,
                cache_kwarg(type(base_of(self.models[m]).layers[0]).forward): None,
                "use_cache": False,
                "position_embeddings": rope[m],
            }

        x = self._transform(embeds, 0)
        last = path.num_hops - 1
        for k, (m, layer_index) in enumerate(path.hop_indices):
            layer = base_of(self.models[m]).layers[layer_index]
            kwargs = layer_kwargs(m, layer_index)
            if path.scale_target == "branch" and k < last and not path.is_identity_at(k + 1):
                x = self._branch_step(layer, x, k + 1, kwargs)
            else:
                x = layer(x, **kwargs)
                if k < last:
                    x = self._transform(x, k + 1)
        return base_of(self.models[path.output_index]).norm(x)

    def _branch_step(
        self, layer: Any, x: torch.Tensor, next_hop: int, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """One decoder layer (same sub-module calls as its forward) with T_next on its MLP output."""
        attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
        residual = x + attn_out
        mlp_out = layer.mlp(layer.post_attention_layernorm(residual))
        return residual + self._transform(mlp_out, next_hop)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits: ``(batch, seq, vocab)`` (causal LM) or ``(batch, num_labels)`` (classification)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        output_model = self.models[self.path.output_index]
        logits = head_of(output_model)(hidden)
        if not self.classification:
            return logits
        return pool_last_token(logits, input_ids, self._pad_token_id())

    def _pad_token_id(self) -> int | None:
        return _pad_token_id(self.models[self.path.input_index].config)


def _pad_token_id(config: Any) -> int | None:
    getter = getattr(config, "get_text_config", None)
    text_config = getter() if callable(getter) else config
    return getattr(text_config, "pad_token_id", None)


def pool_last_token(logits: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Pick each row's logits at its rightmost non-pad token (transformers' sequence-classification rule)."""
    batch = input_ids.shape[0]
    if pad_token_id is None:
        if batch != 1:
            raise InputError("sequence classification with batch size > 1 needs a pad_token_id in the config")
        last = torch.full((1,), -1, dtype=torch.long, device=logits.device)
    else:
        non_pad = (input_ids != pad_token_id).to(logits.device, torch.int32)
        positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
        last = (positions * non_pad).argmax(-1)
    return logits[torch.arange(batch, device=logits.device), last]


# ----------------------------------------------------------------------------------------------
# classification accuracy


def classification_accuracy(
    model: Callable[..., Any],
    encode: Callable[[str], Sequence[int]],
    dataset: Sequence[dict[str, Any]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> float:
    """Accuracy of ``model`` (a ``DfsExecutor`` or an HF ``*ForSequenceClassification``) on
    ``[{"text": str, "label": int}, ...]``; texts are encoded with ``encode`` and right-padded."""
    if not dataset:
        raise InputError("classification dataset is empty")
    for i, row in enumerate(dataset):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise InputError(f"dataset[{i}]: needs a 'text' string")
        label = row.get("label")
        if isinstance(label, bool) or not isinstance(label, int):
            raise InputError(f"dataset[{i}]: needs an integer 'label'")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    correct = 0
    device = next(iter(model.parameters())).device if isinstance(model, nn.Module) else torch.device("cpu")
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            encoded = [list(encode(row["text"])) for row in rows]
            if any(not ids for ids in encoded):
                raise InputError("a dataset text encodes to no tokens")
            width = max(len(ids) for ids in encoded)
            input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for r, ids in enumerate(encoded):
                input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[r, : len(ids)] = 1
            out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device))
            logits = getattr(out, "logits", out)
            predicted = logits.argmax(-1).cpu()
            correct += int((predicted == torch.tensor([row["label"] for row in rows])).sum())
    return correct / len(dataset)
