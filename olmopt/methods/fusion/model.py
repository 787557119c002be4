"""Depth fusion of a loaded Hugging Face model: apply a chain, read/write alphas files, MKA, gradient fit.

The chain (see ``olmopt.ops.fusion``) folds the last decoder layer into the one before it, once per
alpha. ``fuse_model`` applies it in place to a Llama-family ``*ForCausalLM`` (Llama, Mistral, Qwen2,
Qwen3) and keeps the config consistent so ``save_pretrained`` -> ``from_pretrained`` round-trips.
``mka_alphas`` computes the MKA similarity baseline over samples, and ``fit_alphas`` fits the alphas
by gradient descent on calibration data with every other weight frozen. None of the three mutates
anything but what it documents (``fuse_model`` edits its model; the others restore it).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from olmopt.errors import InputError, ModelError
from olmopt.evaluate.formatting import LETTERS, encode_example, render_choices, sharegpt_to_messages
from olmopt.ops.fusion import (
    check_chain,
    diffusion_embedding,
    fuse_tail,
    fusion_pairs,
    fusion_ratio,
    fusion_steps,
    layer_similarity,
    rank_normalise,
)
from olmopt.textio import read_text

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
    _write_fused(_tail_tensors([layers[i] for i in range(survivor, num_layers)]), values)
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
    tensors = _tail_tensors([layers[i] for i in range(survivor, num_layers)])
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


def _tail_tensors(tail: Sequence[nn.Module]) -> dict[str, list[torch.Tensor]]:
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


# ---------------------------------------------------------------------------------------------------
# Alphas files
# ---------------------------------------------------------------------------------------------------

_ALPHA_KEYS = ("ratio_i_alpha", "alpha")
_INTO_KEYS = ("layer_to_merge_into", "into")
_REMOVE_KEYS = ("layer_to_remove", "remove")
_STEP_KEYS = {"step", "ratio_j", *_ALPHA_KEYS, *_INTO_KEYS, *_REMOVE_KEYS}


def parse_alphas(
    data: Any, source: str = "alphas", num_layers: int | None = None, steps: int | None = None
) -> list[float]:
    """The alphas of a parsed alphas file, validated; ``source`` names the file in errors.

    Accepted: the seed's list of step objects (``ratio_i_alpha`` with optional ``step``,
    ``layer_to_merge_into``, ``layer_to_remove``, ``ratio_j``; ``alpha``/``into``/``remove`` also work),
    a plain list of numbers, or ``{"alphas": <either list>, "num_layers": L}``. ``steps`` keeps only the
    first entries (the seed's ``--num_layer``). With ``num_layers`` the count and pairs are checked
    against the model; without it the pairs are checked for being one chain.
    """
    if isinstance(data, dict):
        unknown = set(data) - {"alphas", "num_layers"}
        if "alphas" not in data or unknown:
            raise InputError(f"{source}: an object must have an 'alphas' list (and optionally 'num_layers')")
        declared = data.get("num_layers")
        if declared is not None and num_layers is not None and declared != num_layers:
            raise InputError(f"{source}: written for {declared} layers, the model has {num_layers}")
        num_layers = num_layers if num_layers is not None else declared
        data = data["alphas"]
    if not isinstance(data, list):
        raise InputError(f"{source}: expected a JSON list of fusion steps, got {type(data).__name__}")
    if steps is not None:
        if steps < 1 or steps > len(data):
            raise InputError(f"{source}: asked for {steps} steps, the file has {len(data)}")
        data = data[:steps]
    alphas: list[Any] = []
    pairs: list[tuple[int, int] | None] = []
    for i, entry in enumerate(data):
        alpha, pair = _parse_step(entry, f"{source}: step {i}")
        alphas.append(alpha)
        pairs.append(pair)
    if num_layers is None:
        num_layers = _layers_from_pairs(pairs, source) or len(alphas) + 1
    values = validate_alphas(alphas, num_layers, source)
    for i, (pair, expected) in enumerate(zip(pairs, fusion_pairs(num_layers, len(values)), strict=True)):
        if pair is not None and pair != expected:
            raise InputError(
                f"{source}: step {i} fuses {pair[0]}<-{pair[1]}, but on a {num_layers}-layer model "
                f"step {i} must fuse {expected[0]}<-{expected[1]} (always the last two layers)"
            )
    return values


def _parse_step(entry: Any, where: str) -> tuple[Any, tuple[int, int] | None]:
    if not isinstance(entry, dict):
        return entry, None
    unknown = sorted(set(entry) - _STEP_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_STEP_KEYS))})")
    alpha = next((entry[k] for k in _ALPHA_KEYS if k in entry), None)
    if alpha is None:
        raise InputError(f"{where}: missing 'ratio_i_alpha'")
    ratio_j = entry.get("ratio_j")
    if (
        ratio_j is not None
        and isinstance(alpha, int | float)
        and (not isinstance(ratio_j, int | float) or abs(float(ratio_j) - (1.0 - float(alpha))) > 1e-4)
    ):
        raise InputError(f"{where}: ratio_j {ratio_j} is not 1 - ratio_i_alpha ({1.0 - float(alpha):.6g})")
    into = next((entry[k] for k in _INTO_KEYS if k in entry), None)
    remove = next((entry[k] for k in _REMOVE_KEYS if k in entry), None)
    if into is None and remove is None:
        return alpha, None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (into, remove)):
        raise InputError(f"{where}: layer_to_merge_into and layer_to_remove must both be integers")
    assert isinstance(into, int) and isinstance(remove, int)  # checked just above
    return alpha, (into, remove)


def _layers_from_pairs(pairs: list[tuple[int, int] | None], source: str) -> int | None:
    """The layer count implied by the first step's pair (``remove + 1``), if any pair is given."""
    for i, pair in enumerate(pairs):
        if pair is not None:
            return pair[1] + 1 + i
    return None


def load_alphas(path: str | Path, num_layers: int | None = None, steps: int | None = None) -> list[float]:
    """Read and validate an alphas file (see ``parse_alphas``)."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, "alphas file"))
    except json.JSONDecodeError as exc:
        raise InputError(f"alphas file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    return parse_alphas(data, f"alphas file {path}", num_layers, steps)


def alphas_records(num_layers: int, alphas: Sequence[float]) -> list[dict[str, Any]]:
    """The seed's ``fusion_alphas.json`` records (steps numbered from 0) for ``alphas``."""
    return [
        {
            "step": i,
            "layer_to_merge_into": step.into,
            "layer_to_remove": step.remove,
            "ratio_i_alpha": step.alpha,
            "ratio_j": 1.0 - step.alpha,
        }
        for i, step in enumerate(fusion_steps(num_layers, alphas))
    ]


# ---------------------------------------------------------------------------------------------------
# MKA similarity baseline
# ---------------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad id 0, masked out) and the attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def layer_representations(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Per decoder layer, an ``(N, hidden)`` float64 matrix: each text's mean output over its tokens."""
    layers = decoder_layers(model)
    encoded = []
    for i, text in enumerate(texts):
        tokens = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])
        if not tokens:
            raise InputError(f"MKA text {i} encodes to no tokens")
        encoded.append(tokens)
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int):
        def record(_module, _inputs, output) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    pooled: list[list[torch.Tensor]] = [[] for _ in layers]
    device = _device_of(model)
    try:
        with _eval_mode(model), torch.no_grad():
            starts = range(0, len(encoded), batch_size)
            for start in tqdm(starts, desc="MKA activations", disable=not progress):
                ids, mask = _pad(encoded[start : start + batch_size], device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                weights = mask.unsqueeze(-1).double()
                for index in range(len(layers)):
                    hidden = captured[index].double()
                    pooled[index].append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in pooled]


def mka_alphas(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    steps: int,
    *,
    beta: float = 1.0,
    sigma_k: float = 8.0,
    kernel_alpha: float = 0.5,
    dims: int = 2,
    n_neighbors: int = 5,
    k_entropy: int = 50,
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> list[float]:
    """MKA's baseline alphas for ``steps`` chain steps: ``sigmoid(beta * s_keep / (s_keep + s_drop))``.

    Each layer is represented by its output, mean-pooled per text, so the diffusion kernel compares
    the N samples (the seed compared the first N token positions of one sample). Step ``i`` uses the
    original layers ``(L-2-i, L-1-i)``, as the seed does. Each alpha lies in (0.5, 0.731).
    """
    num_layers = len(decoder_layers(model))
    try:
        check_chain(num_layers, steps)
    except ValueError as exc:
        raise InputError(f"MKA: {exc}") from None
    needed = max(dims + 2, n_neighbors + 1)
    if len(texts) < needed:
        raise InputError(f"MKA needs at least {needed} texts (one sample each), got {len(texts)}")
    reps = layer_representations(model, tokenizer, texts, batch_size, max_length, progress)
    embeddings = [rank_normalise(diffusion_embedding(r, sigma_k, kernel_alpha, dims)) for r in reps]
    similarity = layer_similarity(embeddings, n_neighbors, k_entropy)
    return [fusion_ratio(similarity, keep, drop, beta) for keep, drop in fusion_pairs(num_layers, steps)]


# ---------------------------------------------------------------------------------------------------
# Gradient fit of the alphas
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationExample:
    """Token ids of prompt + answer and the positions (into ``ids``) whose tokens are scored."""

    ids: list[int]
    targets: list[int]


def encode_calibration(
    tokenizer: Any, examples: Sequence[dict[str, Any]], max_length: int = 512
) -> list[CalibrationExample]:
    """Encode ShareGPT items (all answer tokens + EOS scored) or multiple-choice items (the letter).

    ShareGPT: ``{"conversation": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}``.
    Multiple choice: ``{"question": str, "choices": [str, ...], "answer": index}``, asked as
    ``render_choices`` and scored on the first token of the correct letter. Prompts longer than
    ``max_length`` lose their oldest tokens.
    """
    if not examples:
        raise InputError("calibration data is empty")
    out: list[CalibrationExample] = []
    for i, item in enumerate(examples):
        prompt, answer, scored = _encode_item(tokenizer, item, f"calibration item {i}")
        if not answer:
            raise InputError(f"calibration item {i}: the answer encodes to no tokens")
        answer = answer[: max_length - 1]
        prompt = prompt[max(0, len(prompt) - (max_length - len(answer))) :]
        if not prompt:
            raise InputError(f"calibration item {i}: no room for the prompt within {max_length} tokens")
        count = len(answer) if scored is None else 1
        out.append(CalibrationExample(prompt + answer, list(range(len(prompt), len(prompt) + count))))
    return out


def _encode_item(tokenizer: Any, item: Any, where: str) -> tuple[list[int], list[int], int | None]:
    if isinstance(item, dict) and "conversation" in item:
        conversation = item["conversation"]
        if not isinstance(conversation, list) or len(conversation) < 2:
            raise InputError(f"{where}: 'conversation' must be a list of at least two turns")
        if not all(isinstance(t, dict) and "from" in t and "value" in t for t in conversation):
            raise InputError(f"{where}: every turn needs 'from' and 'value'")
        messages, answer = sharegpt_to_messages(conversation)
        prompt, answer_ids = encode_example(tokenizer, messages, answer)
        return prompt, answer_ids, None
    if isinstance(item, dict) and {"question", "choices", "answer"} <= set(item):
        choices, answer = item["choices"], item["answer"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise InputError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise InputError(f"{where}: 'answer' must be a choice index in [0, {len(choices) - 1}]")
        messages = [
            {"role": "user", "content": render_choices(str(item["question"]), [str(c) for c in choices])}
        ]
        prompt, answer_ids = encode_example(tokenizer, messages, LETTERS[answer])
        return prompt, answer_ids, 0
    raise InputError(f"{where}: expected a ShareGPT 'conversation' or 'question'/'choices'/'answer'")


def _batch_loss(
    model: nn.Module, batch: Sequence[CalibrationExample], overrides: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Mean over examples of each example's mean cross-entropy on its scored tokens."""
    device = _device_of(model)
    ids, mask = _pad([ex.ids for ex in batch], device)
    labels = torch.full_like(ids, -100)
    for row, ex in enumerate(batch):
        for pos in ex.targets:
            labels[row, pos] = ids[row, pos]
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    if overrides:
        output = torch.func.functional_call(model, overrides, args=(), kwargs=kwargs, strict=False)
    else:
        output = model(**kwargs)
    logits = output.logits[:, :-1].float()
    target = labels[:, 1:]
    per_token = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view(target.shape)
    scored = (target != -100).float()
    return ((per_token * scored).sum(1) / scored.sum(1)).mean()


def calibration_loss(model: nn.Module, encoded: Sequence[CalibrationExample], batch_size: int = 8) -> float:
    """The fit objective of ``model`` as it is (e.g. after ``fuse_model``): mean per-example CE."""
    total = 0.0
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            total += float(_batch_loss(model, batch)) * len(batch)
    return total / len(encoded)


@contextmanager
def _fused_view(model: nn.Module, survivor: int) -> Iterator[str]:
    """Run only layers ``0..survivor`` with every parameter frozen; yields the layers' name prefix."""
    layers = decoder_layers(model)
    inner = getattr(model, "model", model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    config: Any = model.config
    old_count = config.num_hidden_layers
    for p, _ in flags:
        p.requires_grad_(False)
    inner.layers = nn.ModuleList(list(layers)[: survivor + 1])
    config.num_hidden_layers = survivor + 1
    try:
        with _eval_mode(model):
            yield prefix
    finally:
        inner.layers = layers
        config.num_hidden_layers = old_count
        for p, flag in flags:
            p.requires_grad_(flag)


def fit_alphas(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    steps: int,
    init: float | Sequence[float] = 0.5,
    lr: float = 0.05,
    *,
    iterations: int = 30,
    batch_size: int = 8,
    max_length: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Fit the ``steps`` chain alphas by projected Adam on the calibration loss; returns them in [0, 1].

    ``model`` is the unfused model and is left as it was. The fused forward builds the surviving
    layer's tensors from the alphas (closed form) and substitutes them with ``functional_call``; only
    the alphas receive gradients. Each iteration is one optimizer step on the next mini-batch of a
    seeded shuffle of ``examples``; after each step the alphas are clamped to [0, 1].
    """
    layers = decoder_layers(model)
    num_layers = len(layers)
    start = [float(init)] * steps if isinstance(init, int | float) else list(init)
    if len(start) != steps:
        raise InputError(f"fit_alphas: init has {len(start)} alphas for {steps} steps")
    start = validate_alphas(start, num_layers, "fit_alphas init")
    if iterations < 1 or batch_size < 1 or lr <= 0 or not math.isfinite(lr):
        raise InputError("fit_alphas: iterations and batch_size must be >= 1 and lr a positive number")
    encoded = encode_calibration(tokenizer, examples, max_length)
    survivor = num_layers - 1 - steps
    device = _device_of(model)
    tails = {
        name: [t.detach() for t in tensors]
        for name, tensors in _tail_tensors([layers[i] for i in range(survivor, num_layers)]).items()
    }
    alphas = torch.tensor(start, dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([alphas], lr=lr)
    order = list(range(len(encoded)))
    rng = random.Random(seed)
    cursor = len(order)
    with _fused_view(model, survivor) as prefix:
        for _ in tqdm(range(iterations), desc="fit alphas", disable=not progress):
            if cursor + batch_size > len(order):
                rng.shuffle(order)
                cursor = 0
            batch = [encoded[i] for i in order[cursor : cursor + batch_size]]
            cursor += batch_size
            overrides = {f"{prefix}.{survivor}.{name}": fuse_tail(t, alphas) for name, t in tails.items()}
            loss = _batch_loss(model, batch, overrides)
            optimizer.zero_grad()
            (grad,) = torch.autograd.grad(loss, [alphas])
            alphas.grad = grad
            optimizer.step()
            with torch.no_grad():
                alphas.clamp_(0.0, 1.0)
    return [float(a) for a in alphas.detach().cpu()]
