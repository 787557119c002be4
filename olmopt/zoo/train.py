"""Model construction and the deterministic CPU training
loop of the zoo (base pretraining and specialists)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from olmopt.evaluate.formatting import encode_example
from olmopt.zoo.skills import Item

Encoded = tuple[list[int], list[int]]

SIZES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 172},
    "small": {"hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 344},
}
ARCHS = ("llama", "qwen2", "mistral")
MAX_POSITIONS = 64


def make_model(size: str, arch: str, tokenizer, seed: int) -> PreTrainedModel:
    """A freshly initialised float32 model; ``torch.manual_seed(seed)`` precedes the init."""
    common = dict(
        SIZES[size],
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    heads = SIZES[size]["num_attention_heads"]
    build: Callable[[], PreTrainedModel]  # the config first; the seeded init below
    if arch == "llama":
        llama = LlamaConfig(**common, tie_word_embeddings=False)
        build = lambda: LlamaForCausalLM(llama)  # noqa: E731
    elif arch == "qwen2":  # q/k/v biases, tied embeddings
        qwen2 = Qwen2Config(**common, tie_word_embeddings=True, num_key_value_heads=heads)
        build = lambda: Qwen2ForCausalLM(qwen2)  # noqa: E731
    else:  # mistral with grouped-query attention
        mistral = MistralConfig(
            **common, tie_word_embeddings=False, num_key_value_heads=heads // 2, sliding_window=None
        )
        build = lambda: MistralForCausalLM(mistral)  # noqa: E731
    torch.manual_seed(seed)
    model = build()
    return model.to(torch.float32)  # type: ignore[arg-type]  # transformers types PreTrainedModel.to's wrapper wrongly


def encode_items(tokenizer, items: Sequence[Item]) -> list[Encoded]:
    """Chat-encode (prompt, answer) items with the shared ``encode_example`` (one user turn)."""
    return [encode_example(tokenizer, [{"role": "user", "content": p}], a) for p, a in items]


def collate(batch: Sequence[Encoded], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and next-token labels (-100 outside the answer ids)."""
    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(batch):
        seq = prompt + answer
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) : len(seq)] = torch.tensor(answer)
    return ids, labels


def answer_loss(model: PreTrainedModel, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over answer tokens (right padding
    needs no attention mask under causal attention)."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@dataclass(frozen=True)
class TrainPlan:
    """What one training run does: skill mixture, steps, LR,
    batch size and the trainable layers (None = all)."""

    weights: dict[str, float]
    steps: int
    lr: float
    batch_size: int = 32
    layers: tuple[int, ...] | None = None


def lr_at(step: int, plan: TrainPlan) -> float:
    """5 % linear warmup, then cosine down to 10 % of the peak LR."""
    warmup = max(1, int(0.05 * plan.steps))
    if step < warmup:
        return plan.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, plan.steps - warmup)
    return plan.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def freeze_outside(model: PreTrainedModel, layers: tuple[int, ...] | None) -> list[torch.nn.Parameter]:
    """Mark only ``model.layers.{i}`` for i in ``layers``
    trainable (all when None); return those parameters."""
    for name, param in model.named_parameters():
        param.requires_grad = layers is None or any(name.startswith(f"model.layers.{i}.") for i in layers)
    return [p for p in model.parameters() if p.requires_grad]


def train(
    model: PreTrainedModel,
    pools: dict[str, list[Encoded]],
    plan: TrainPlan,
    seed: int,
    pad_id: int,
    on_step: Callable[[float], None] | None = None,
) -> None:
    """AdamW(0.9, 0.98), no weight decay, grad clip 1.0; batches drawn by a dedicated ``torch.Generator``."""
    gen = torch.Generator().manual_seed(seed)
    skills = list(plan.weights)
    weights = torch.tensor([plan.weights[s] for s in skills], dtype=torch.float64)
    params = freeze_outside(model, plan.layers)
    opt = torch.optim.AdamW(params, lr=plan.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for step in range(plan.steps):
        picks = torch.multinomial(weights, plan.batch_size, replacement=True, generator=gen).tolist()
        batch = []
        for k in picks:
            pool = pools[skills[k]]
            batch.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
        ids, labels = collate(batch, pad_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, plan)
        loss = answer_loss(model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if on_step is not None:
            on_step(float(loss.detach()))
    for param in model.parameters():
        param.requires_grad = True
    model.eval()


def data_rng(seed: int) -> random.Random:
    """The ``random.Random`` used for a zoo's training data."""
    return random.Random(seed)
