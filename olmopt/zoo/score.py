"""Teacher-forced exact match: every answer position (``</s>`` included) must be the argmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from olmopt.zoo.train import collate

Encoded = tuple[list[int], list[int]]


@torch.no_grad()
def exact_match(
    model: PreTrainedModel, items: Sequence[Encoded], pad_id: int, batch_size: int = 100
) -> float:
    """Fraction of (prompt ids, answer ids) items whose answer
    the model reproduces exactly under teacher forcing."""
    if not items:
        return 0.0
    model.eval()
    hits = 0
    for start in range(0, len(items), batch_size):
        ids, labels = collate(items[start : start + batch_size], pad_id)
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        wrong = (pred != target) & (target != -100)
        hits += int((~wrong.any(dim=1)).sum())
    return hits / len(items)
