"""Data-flow-space (DFS) merges: run a layer path on resident models, and export it as a plain model.

``DfsExecutor(models, path)`` runs a ``DfsPath`` directly on the models' own decoder layers (a layer
used by several hops is the same module, never copied) and returns logits like the HF forward:
``(batch, seq, vocab)`` for causal LMs, ``(batch, num_labels)`` for sequence classification
(last non-pad token pooling, as transformers does). ``export_path`` folds the path's transforms into
the weights and writes a standard LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (or
``*ForSequenceClassification``) directory whose logits equal the executor's. ``load_dfs_recipe``
reads the seed's YAML recipe layout safely. Semantics and the fold derivation: docs/dfs.md.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from olmopt.errors import InputError
from olmopt.ops.dfs import (
    NEUTRAL_SCALE,
    DfsPath,
    HopAffine,
    affine_transform,
    as_layer_mask,
    fold_into_embedding,
    fold_into_output_projection,
    path_from_mask,
    stream_ratios,
    validate_path,
)
from olmopt.outdir import ShardedSafetensorsWriter, atomic_output_dir, copy_side_files
from olmopt.runtime import cache_kwarg
from olmopt.textio import read_text

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaForSequenceClassification",
    "MistralForSequenceClassification",
    "Qwen2ForSequenceClassification",
)
EXPORT_HOMOLOGY_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "sliding_window",
    "use_sliding_window",
)
PATH_FILE = "dfs_path.json"
_NOT_PER_LAYER = frozenset({"architectures"})


# ----------------------------------------------------------------------------------------------
# model structure helpers


# transformers models are read by submodule and config names (``base_model.layers``, ``config.layer_types``),
# which torch types as ``Tensor | Module``: these helpers take and give ``Any``


def _base(model: Any) -> Any:
    return model.base_model


def _is_classifier(model: Any) -> bool:
    return isinstance(getattr(model, "score", None), nn.Linear)


def _head(model: Any) -> Any:
    if _is_classifier(model):
        return model.score
    head = model.get_output_embeddings()
    if head is None:
        raise InputError(f"{type(model).__name__}: no lm_head or score head to produce logits")
    return head


def _check_structure(models: Sequence[PreTrainedModel]) -> None:
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
        _check_structure(models)
        validate_path(
            path,
            [len(_base(m).layers) for m in models],
            [int(m.config.hidden_size) for m in models],
        )
        self.models = nn.ModuleList(models)
        self.path = path
        self.classification = _is_classifier(models[path.output_model])
        _head(models[path.output_model])  # raises when the output model has no head
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
        m, layer = self.path.hops[hop]
        return _base(self.models[m]).layers[layer]

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
        embeds = _base(self.models[path.input_model]).embed_tokens(input_ids)
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
                rope[m] = _base(self.models[m]).rotary_emb(embeds, position_ids=position_ids)
            return {
                "attention_mask": masks[(m, kind)],
                "position_ids": position_ids,
                cache_kwarg(type(_base(self.models[m]).layers[0]).forward): None,
                "use_cache": False,
                "position_embeddings": rope[m],
            }

        x = self._transform(embeds, 0)
        last = path.num_hops - 1
        for k, (m, layer_index) in enumerate(path.hops):
            layer = _base(self.models[m]).layers[layer_index]
            kwargs = layer_kwargs(m, layer_index)
            if path.scale_target == "branch" and k < last and not path.is_identity_at(k + 1):
                x = self._branch_step(layer, x, k + 1, kwargs)
            else:
                x = layer(x, **kwargs)
                if k < last:
                    x = self._transform(x, k + 1)
        return _base(self.models[path.output_model]).norm(x)

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
        output_model = self.models[self.path.output_model]
        logits = _head(output_model)(hidden)
        if not self.classification:
            return logits
        return pool_last_token(logits, input_ids, self._pad_token_id())

    def _pad_token_id(self) -> int | None:
        return _pad_token_id(self.models[self.path.input_model].config)


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


# ----------------------------------------------------------------------------------------------
# export


def check_exportable(
    configs: Sequence[PretrainedConfig], path: DfsPath, architecture: str | None = None
) -> None:
    """Raise InputError when ``path`` cannot be folded into one standard model of this pool.

    Needs configs only (run it before loading weights): a supported architecture (``architecture``,
    default the output model's ``config.architectures[0]``), homologous configs for every model the
    path uses, one vocabulary, and transforms that fold exactly.
    """
    validate_path(path, [int(c.num_hidden_layers) for c in configs], [int(c.hidden_size) for c in configs])
    used = path.models_used
    arch = architecture or _architecture(configs[path.output_model])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"cannot export to {arch}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
    reference = configs[path.output_model]
    for m in used:
        for key in EXPORT_HOMOLOGY_KEYS:
            mine, theirs = getattr(configs[m], key, None), getattr(reference, key, None)
            if mine != theirs:
                raise InputError(
                    f"cannot export: config '{key}' of model {m} ({mine!r}) differs from the output model's "
                    f"({theirs!r}); one exported config cannot describe both"
                )
    if configs[path.input_model].vocab_size != reference.vocab_size:
        raise InputError(
            f"cannot export: input model vocab_size {configs[path.input_model].vocab_size} differs from the "
            f"output model's {reference.vocab_size}"
        )
    if path.scale_target == "stream":
        for k in range(1, path.num_hops):
            if path.scales[k] <= 0:
                raise InputError(
                    f"cannot export: hop {k} scales the residual stream by {path.scales[k]:g}; RMSNorm only "
                    "commutes with positive scales (scale_target 'stream' folds need scales > 0)"
                )
    for k in range(1, path.num_hops):
        affine = path.affine_at(k)
        if affine is not None and _nonzero_bias(affine) and not hasattr(reference, "mlp_bias"):
            raise InputError(
                f"cannot export: hop {k} has an affine bias, but {arch} has no MLP bias to fold it into "
                "(architectures with an mlp_bias option, such as Llama, take it)"
            )


def _architecture(config: PretrainedConfig) -> str:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else "unknown architecture"


def _nonzero_bias(affine: HopAffine) -> bool:
    return affine.bias is not None and bool(affine.bias.ne(0).any())


def _needs_mlp_bias(path: DfsPath) -> bool:
    return any((a := path.affine_at(k)) is not None and _nonzero_bias(a) for k in range(1, path.num_hops))


def _ties_embeddings(models: Sequence[PreTrainedModel], path: DfsPath) -> bool:
    out = models[path.output_model]
    if _is_classifier(out) or not getattr(out.config, "tie_word_embeddings", False):
        return False
    return path.input_model == path.output_model and path.is_identity_at(0)


def exported_config(models: Sequence[PreTrainedModel], path: DfsPath) -> PretrainedConfig:
    """The config of the exported model: the input model's, one layer per hop, per-layer lists re-indexed."""
    input_config = models[path.input_model].config
    output_model = models[path.output_model]
    config = copy.deepcopy(input_config)
    source_layers = int(input_config.num_hidden_layers)
    config.num_hidden_layers = path.num_hops
    for key, value in input_config.to_dict().items():
        if key in _NOT_PER_LAYER or not isinstance(value, list) or len(value) != source_layers:
            continue
        per_hop = []
        for k, (m, layer) in enumerate(path.hops):
            values = getattr(models[m].config, key, None)
            if not isinstance(values, list | tuple) or layer >= len(values):
                raise InputError(f"cannot export: hop {k}: model {m} has no per-layer config '{key}'")
            per_hop.append(values[layer])
        setattr(config, key, per_hop)
    config.architectures = [type(output_model).__name__]
    config.tie_word_embeddings = _ties_embeddings(models, path)
    if _needs_mlp_bias(path):
        config.mlp_bias = True
    if _is_classifier(output_model):
        for key in ("num_labels", "id2label", "label2id", "problem_type"):
            if hasattr(output_model.config, key):
                setattr(config, key, copy.deepcopy(getattr(output_model.config, key)))
    dtype = next(output_model.parameters()).dtype
    config.dtype = str(dtype).removeprefix("torch.")
    return config


def exported_tensors(models: Sequence[PreTrainedModel], path: DfsPath) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of the exported model, one hop's layer at a time.

    A layer used by several hops is copied for every hop after the first (no two names share memory).
    """
    seen: set[tuple[int, Any]] = set()
    for name, tensor in _exported_tensors(models, path):
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            tensor = tensor.clone()
        else:
            seen.add(key)
        yield name, tensor


def _exported_tensors(models: Sequence[PreTrainedModel], path: DfsPath) -> Iterator[tuple[str, torch.Tensor]]:
    _check_structure(models)
    check_exportable([m.config for m in models], path, type(models[path.output_model]).__name__)
    output_model = models[path.output_model]
    prefix = output_model.base_model_prefix
    embedding = _base(models[path.input_model]).embed_tokens.weight.detach()
    embedding_scale = path.scales[0]
    if not path.is_identity_at(0):
        embedding = fold_into_embedding(embedding, embedding_scale, path.affine_at(0))
    yield f"{prefix}.embed_tokens.weight", embedding
    add_mlp_bias = _needs_mlp_bias(path) and not getattr(output_model.config, "mlp_bias", False)
    ratios = stream_ratios(path.scales) if path.scale_target == "stream" else None
    last = path.num_hops - 1
    for k, (m, layer_index) in enumerate(path.hops):
        layer = _base(models[m]).layers[layer_index]
        state = {name: t.detach() for name, t in layer.state_dict().items()}
        if ratios is not None:
            _fold_stream_ratio(state, ratios[k], k)
        elif k < last and not path.is_identity_at(k + 1):
            _fold_branch(state, path.scales[k + 1], path.affine_at(k + 1), k)
        if add_mlp_bias:
            _add_zero_mlp_biases(state, layer)
        for name, tensor in state.items():
            yield f"{prefix}.layers.{k}.{name}", tensor
    for name, tensor in _base(output_model).norm.state_dict().items():
        yield f"{prefix}.norm.{name}", tensor.detach()
    head_name = "score" if _is_classifier(output_model) else "lm_head"
    if not _ties_embeddings(models, path):
        for name, tensor in _head(output_model).state_dict().items():
            yield f"{head_name}.{name}", tensor.detach()


def _fold_branch(state: dict[str, torch.Tensor], scale: float, affine: HopAffine | None, hop: int) -> None:
    if "mlp.down_proj.weight" not in state:
        raise InputError(
            f"cannot export: hop {hop}'s layer has no mlp.down_proj to fold the next hop's transform into"
        )
    weight, bias = fold_into_output_projection(
        state["mlp.down_proj.weight"], state.get("mlp.down_proj.bias"), scale, affine
    )
    state["mlp.down_proj.weight"] = weight
    if bias is not None:
        state["mlp.down_proj.bias"] = bias


def _fold_stream_ratio(state: dict[str, torch.Tensor], ratio: float, hop: int) -> None:
    if ratio == NEUTRAL_SCALE:
        return
    for proj in ("self_attn.o_proj", "mlp.down_proj"):
        if f"{proj}.weight" not in state:
            raise InputError(f"cannot export: hop {hop}'s layer has no {proj} to fold the stream scale into")
        for suffix in (".weight", ".bias"):
            if f"{proj}{suffix}" in state:
                tensor = state[f"{proj}{suffix}"]
                state[f"{proj}{suffix}"] = (tensor.double() / ratio).to(tensor.dtype)


def _add_zero_mlp_biases(state: dict[str, torch.Tensor], layer: nn.Module) -> None:
    for proj in ("gate_proj", "up_proj", "down_proj"):
        name = f"mlp.{proj}.bias"
        if name not in state:
            linear = getattr(layer.mlp, proj)
            state[name] = torch.zeros(linear.out_features, dtype=linear.weight.dtype)


def export_path(
    models: Sequence[PreTrainedModel],
    path: DfsPath,
    out_dir: str | Path,
    *,
    force: bool = False,
    side_files_from: str | Path | None = None,
    sources: Sequence[str] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write the path as a standard HF model directory at ``out_dir`` (atomically) and return it.

    ``side_files_from`` (the input model's directory) supplies tokenizer and generation files;
    ``sources`` (model names) is recorded with the path in ``dfs_path.json``. Nothing is written when
    the path cannot be exported (InputError).
    """
    _check_structure(models)
    check_exportable([m.config for m in models], path, type(models[path.output_model]).__name__)
    config = exported_config(models, path)
    with atomic_output_dir(out_dir, force, inputs=[side_files_from] if side_files_from is not None else []) as tmp:
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
        writer = (
            ShardedSafetensorsWriter(tmp)
            if max_shard_bytes is None
            else ShardedSafetensorsWriter(tmp, max_shard_bytes=max_shard_bytes)
        )
        for name, tensor in exported_tensors(models, path):
            writer.add(name, tensor)
        writer.close()
        config.save_pretrained(tmp)
        record = {"path": path.to_dict(), "sources": list(sources) if sources is not None else None}
        (tmp / PATH_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_dir)


def build_exported_model(models: Sequence[PreTrainedModel], path: DfsPath) -> PreTrainedModel:
    """The exported model in memory (same tensors ``export_path`` writes), for checks and evaluation."""
    config = exported_config(models, path)
    model = type(models[path.output_model])(config)
    state = dict(exported_tensors(models, path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]:
        raise InputError(
            f"exported tensors do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    dtype = next(models[path.output_model].parameters()).dtype
    return model.to(dtype).eval()  # type: ignore[arg-type]  # transformers types PreTrainedModel.to's wrapper wrongly


# ----------------------------------------------------------------------------------------------
# the seed's YAML recipe


class SeedRecipeLoader(yaml.SafeLoader):
    """SafeLoader plus exactly two python tags of the seed's files: OrderedDict (as dict) and tuple."""


def _construct_ordered_dict(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
    if isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        args = loader.construct_mapping(node, deep=True).get("args", [])
    else:
        args = []
    pairs = args[0] if args else []
    try:
        return {key: value for key, value in pairs}  # noqa: C416 - pairs may be lists
    except (TypeError, ValueError):
        raise yaml.constructor.ConstructorError(
            None, None, "OrderedDict arguments must be a list of [key, value] pairs", node.start_mark
        ) from None


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
    return tuple(loader.construct_sequence(node, deep=True))


SeedRecipeLoader.add_constructor(
    "tag:yaml.org,2002:python/object/apply:collections.OrderedDict", _construct_ordered_dict
)
SeedRecipeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)

_RECIPE_KEYS = frozenset(
    {
        "model_paths",
        "num_r",
        "layer_mask",
        "scaling_factors",
        "bias_factors",
        "input_layer_model",
        "output_layer_model",
        "add_last_layer",
        "last_layer_scale",
        "classification",
        "scale_target",
    }
)


@dataclass(frozen=True)
class DfsRecipe:
    """A DFS recipe as the seed's YAML states it, before the pool's depths are known."""

    models: tuple[tuple[str, str | None], ...]
    mask: np.ndarray
    scaling_factors: Any
    bias_factors: Any
    input_model: int
    output_model: int
    add_last_layer: bool
    last_layer_scale: float
    classification: bool
    scale_target: str

    def to_path(self, layer_counts: Sequence[int], hidden_size: int) -> DfsPath:
        """Decode into a ``DfsPath``; scalar or (H, H) matrix scales, scalar or (H,) biases per slot."""
        scales = np.asarray(
            self.scaling_factors if self.scaling_factors is not None else 1.0, dtype=np.float64
        )
        if scales.ndim == 0:
            scales = np.full(self.mask.shape, float(scales))
        biases = np.asarray(self.bias_factors if self.bias_factors is not None else 0.0, dtype=np.float64)
        if biases.ndim == 0:
            biases = np.full(self.mask.shape, float(biases))
        shape = self.mask.shape
        if scales.shape not in (shape, (*shape, hidden_size, hidden_size)):
            raise InputError(
                f"scaling_factors has shape {scales.shape}; expected {shape} (scalars) or "
                f"{(*shape, hidden_size, hidden_size)} (one matrix per slot)"
            )
        if biases.shape not in (shape, (*shape, hidden_size)):
            raise InputError(
                f"bias_factors has shape {biases.shape}; expected {shape} (scalars) or {(*shape, hidden_size)}"
            )
        if biases.shape == shape:
            biases = np.repeat(biases[..., None], hidden_size, axis=-1)
        matrices = scales.ndim == 5
        identity = np.eye(hidden_size)
        for idx in np.argwhere(~self.mask):
            r, m, l_ = (int(i) for i in idx)
            neutral_scale = (
                np.array_equal(scales[r, m, l_], identity) if matrices else scales[r, m, l_] == 1.0
            )
            if not neutral_scale or biases[r, m, l_].any():
                raise InputError(
                    f"scaling_factors/bias_factors[{r}][{m}][{l_}] is set for an inactive layer_mask slot "
                    "(inactive slots must hold 1.0 / identity and bias 0)"
                )
        hop_scales: list[float] = []
        affine: list[HopAffine | None] = []
        for idx in np.argwhere(self.mask):
            r, m, l_ = (int(i) for i in idx)
            bias = biases[r, m, l_]
            bias_tensor = torch.tensor(bias, dtype=torch.float32) if bias.any() else None
            if matrices:
                hop_scales.append(1.0)
                weight = torch.tensor(scales[r, m, l_], dtype=torch.float32)
                affine.append(HopAffine(weight=weight, bias=bias_tensor))
            else:
                hop_scales.append(float(scales[r, m, l_]))
                affine.append(None if bias_tensor is None else HopAffine(bias=bias_tensor))
        return path_from_mask(
            self.mask,
            hop_scales,
            affine=affine if any(a is not None for a in affine) else None,
            input_model=self.input_model,
            output_model=self.output_model,
            layer_counts=layer_counts,
            append_last_layer=self.add_last_layer,
            last_layer_scale=self.last_layer_scale,
            scale_target=self.scale_target,  # type: ignore[arg-type]
        )


def load_dfs_recipe(file: str | Path) -> DfsRecipe:
    """Read a DFS recipe (the seed's YAML layout, python tags included) without running any code."""
    file = Path(file)
    text = read_text(file)
    try:
        data = yaml.load(text, Loader=SeedRecipeLoader)  # noqa: S506 - SafeLoader subclass, two tags only
    except yaml.YAMLError as exc:
        reason = _yaml_reason(exc)
        raise InputError(f"{file}: not a valid recipe YAML: {reason}") from None
    try:
        return _recipe_from_dict(data)
    except InputError as exc:
        raise InputError(f"{file}: {exc}") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def _recipe_from_dict(data: Any) -> DfsRecipe:
    if not isinstance(data, dict):
        raise InputError("a DFS recipe must be a mapping with model_paths and layer_mask")
    unknown = set(data) - _RECIPE_KEYS
    if unknown:
        raise InputError(f"unknown key(s) {sorted(map(str, unknown))}; known: {sorted(_RECIPE_KEYS)}")
    for key in ("model_paths", "layer_mask"):
        if key not in data:
            raise InputError(f"missing key '{key}'")
    models = _model_refs(data["model_paths"])
    mask = as_layer_mask(data["layer_mask"])
    if mask.shape[1] != len(models):
        raise InputError(f"layer_mask covers {mask.shape[1]} models but model_paths lists {len(models)}")
    num_r = data.get("num_r")
    if num_r is not None and (isinstance(num_r, bool) or not isinstance(num_r, int)):
        raise InputError(f"num_r must be an integer, got {num_r!r}")
    if num_r is not None and num_r != mask.shape[0]:
        raise InputError(f"num_r = {num_r} but layer_mask has {mask.shape[0]} repetitions")
    flags = {}
    for key, default in (("add_last_layer", True), ("classification", False)):
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise InputError(f"'{key}' must be true or false, got {value!r}")
        flags[key] = value
    last_scale = data.get("last_layer_scale", 1.0)
    if isinstance(last_scale, bool) or not isinstance(last_scale, int | float):
        raise InputError(f"'last_layer_scale' must be a number, got {last_scale!r}")
    indices = {}
    for key in ("input_layer_model", "output_layer_model"):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(models):
            raise InputError(f"'{key}' must be a model index in 0..{len(models) - 1}, got {value!r}")
        indices[key] = value
    for key in ("scaling_factors", "bias_factors"):
        value = data.get(key)
        if value is not None:
            try:
                np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"'{key}' must be a rectangular array of numbers") from None
    return DfsRecipe(
        models=models,
        mask=mask,
        scaling_factors=data.get("scaling_factors"),
        bias_factors=data.get("bias_factors"),
        input_model=indices["input_layer_model"],
        output_model=indices["output_layer_model"],
        add_last_layer=flags["add_last_layer"],
        last_layer_scale=float(last_scale),
        classification=flags["classification"],
        scale_target=str(data.get("scale_target", "branch")),
    )


def _model_refs(value: Any) -> tuple[tuple[str, str | None], ...]:
    if not isinstance(value, list | tuple) or not value:
        raise InputError("'model_paths' must be a non-empty list of model paths or [path, revision] pairs")
    refs: list[tuple[str, str | None]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            refs.append((item, None))
        elif (
            isinstance(item, list | tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and (item[1] is None or isinstance(item[1], str))
        ):
            refs.append((item[0], item[1]))
        else:
            raise InputError(f"model_paths[{i}] must be a path or a [path, revision] pair, got {item!r}")
    return tuple(refs)
