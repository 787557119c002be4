"""Export a data-flow-space (DFS) path as a standard model: the transforms folded into the weights.

``export_path`` writes a standard LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM (or
``*ForSequenceClassification``) directory whose logits equal ``DfsExecutor``'s, with the path in
``dfs_path.json``; ``check_exportable`` refuses, from the configs alone, a path that cannot be folded.
The fold derivation: docs/dfs.md.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from olmopt.errors import InputError
from olmopt.methods.dfs.executor import base_of, check_structure, head_of, is_classifier
from olmopt.methods.dfs.maths import (
    fold_into_embedding,
    fold_into_output_projection,
    stream_ratios,
    validate_path,
)
from olmopt.methods.dfs.path import NEUTRAL_SCALE, DfsPath, HopAffine
from olmopt.outdir import ShardedSafetensorsWriter, atomic_output_dir, copy_side_files

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


def check_exportable(
    configs: Sequence[PretrainedConfig], path: DfsPath, architecture: str | None = None
) -> None:
    """Raise InputError when ``path`` cannot be folded into one standard model of this pool.

    Needs configs only (run it before loading weights): a supported architecture (``architecture``,
    default the output model's ``config.architectures[0]``), homologous configs for every model the
    path uses, one vocabulary, and transforms that fold exactly.
    """
    validate_path(path, [int(c.num_hidden_layers) for c in configs], [int(c.hidden_size) for c in configs])
    used = sorted({m for m, _ in path.hop_indices} | {path.input_index, path.output_index})
    arch = architecture or _architecture(configs[path.output_index])
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"cannot export to {arch}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}")
    reference = configs[path.output_index]
    for m in used:
        for key in EXPORT_HOMOLOGY_KEYS:
            mine, theirs = getattr(configs[m], key, None), getattr(reference, key, None)
            if mine != theirs:
                raise InputError(
                    f"cannot export: config '{key}' of model {m} ({mine!r}) differs from the output model's "
                    f"({theirs!r}); one exported config cannot describe both"
                )
    if configs[path.input_index].vocab_size != reference.vocab_size:
        raise InputError(
            f"cannot export: input model vocab_size {configs[path.input_index].vocab_size} differs from the "
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
    out = models[path.output_index]
    if is_classifier(out) or not getattr(out.config, "tie_word_embeddings", False):
        return False
    return path.input_index == path.output_index and path.is_identity_at(0)


def exported_config(models: Sequence[PreTrainedModel], path: DfsPath) -> PretrainedConfig:
    """The config of the exported model: the input model's, one layer per hop, per-layer lists re-indexed."""
    input_config = models[path.input_index].config
    output_model = models[path.output_index]
    config = copy.deepcopy(input_config)
    source_layers = int(input_config.num_hidden_layers)
    config.num_hidden_layers = path.num_hops
    for key, value in input_config.to_dict().items():
        if key in _NOT_PER_LAYER or not isinstance(value, list) or len(value) != source_layers:
            continue
        per_hop = []
        for k, (m, layer) in enumerate(path.hop_indices):
            values = getattr(models[m].config, key, None)
            if not isinstance(values, list | tuple) or layer >= len(values):
                raise InputError(f"cannot export: hop {k}: model {m} has no per-layer config '{key}'")
            per_hop.append(values[layer])
        setattr(config, key, per_hop)
    config.architectures = [type(output_model).__name__]
    config.tie_word_embeddings = _ties_embeddings(models, path)
    if _needs_mlp_bias(path):
        config.mlp_bias = True
    if is_classifier(output_model):
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
    check_structure(models)
    check_exportable([m.config for m in models], path, type(models[path.output_index]).__name__)
    output_model = models[path.output_index]
    prefix = output_model.base_model_prefix
    embedding = base_of(models[path.input_index]).embed_tokens.weight.detach()
    embedding_scale = path.scales[0]
    if not path.is_identity_at(0):
        embedding = fold_into_embedding(embedding, embedding_scale, path.affine_at(0))
    yield f"{prefix}.embed_tokens.weight", embedding
    add_mlp_bias = _needs_mlp_bias(path) and not getattr(output_model.config, "mlp_bias", False)
    ratios = stream_ratios(path.scales) if path.scale_target == "stream" else None
    last = path.num_hops - 1
    for k, (m, layer_index) in enumerate(path.hop_indices):
        layer = base_of(models[m]).layers[layer_index]
        state = {name: t.detach() for name, t in layer.state_dict().items()}
        if ratios is not None:
            _fold_stream_ratio(state, ratios[k], k)
        elif k < last and not path.is_identity_at(k + 1):
            _fold_branch(state, path.scales[k + 1], path.affine_at(k + 1), k)
        if add_mlp_bias:
            _add_zero_mlp_biases(state, layer)
        for name, tensor in state.items():
            yield f"{prefix}.layers.{k}.{name}", tensor
    for name, tensor in base_of(output_model).norm.state_dict().items():
        yield f"{prefix}.norm.{name}", tensor.detach()
    head_name = "score" if is_classifier(output_model) else "lm_head"
    if not _ties_embeddings(models, path):
        for name, tensor in head_of(output_model).state_dict().items():
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
    check_structure(models)
    check_exportable([m.config for m in models], path, type(models[path.output_index]).__name__)
    config = exported_config(models, path)
    with atomic_output_dir(
        out_dir, force, inputs=[side_files_from] if side_files_from is not None else []
    ) as tmp:
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
    model = type(models[path.output_index])(config)
    state = dict(exported_tensors(models, path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]:
        raise InputError(
            f"exported tensors do not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    dtype = next(models[path.output_index].parameters()).dtype
    return model.to(dtype).eval()  # type: ignore[arg-type]  # transformers types PreTrainedModel.to's wrapper wrongly
