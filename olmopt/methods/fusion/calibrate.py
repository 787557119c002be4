"""Fusion alphas from data: the MKA similarity baseline and the gradient fit on calibration data.

``mka_alphas`` computes the MKA similarity baseline over samples, and ``fit_alphas`` fits the alphas
by gradient descent on calibration data with every other weight frozen. Both leave the model as it
was.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from olmopt.errors import InputError
from olmopt.evaluate.formatting import LETTERS, encode_example, render_choices, sharegpt_to_messages
from olmopt.methods.fusion.maths import (
    check_chain,
    diffusion_embedding,
    fuse_tail,
    fusion_pairs,
    fusion_ratio,
    layer_similarity,
    rank_normalise,
)
from olmopt.methods.fusion.model import decoder_layers, tail_tensors, validate_alphas

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
        for name, tensors in tail_tensors([layers[i] for i in range(survivor, num_layers)]).items()
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
