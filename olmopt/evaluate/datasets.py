"""Evaluation datasets: OLM ShareGPT JSON and multiple-choice JSON, encoded once and split.

An objective names a dataset file, a metric, a held-out fraction and a sealed test fraction. The test
part is the last ``ceil(test * n)`` items of the file, the held-out part the ``ceil(held_out * n)`` items
before it, the search part the rest. ``samples`` caps each part. Search and selection never read the
test part: it is scored once, at export.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from olmopt.errors import InputError
from olmopt.evaluate.formatting import (
    LETTERS,
    ROLE_OF,
    encode_answer,
    encode_prompt,
    render_choices,
    sharegpt_to_messages,
)

Split = Literal["search", "held_out", "test"]


@dataclass(frozen=True)
class Example:
    """One item: chat messages before the answer, the expected answer, and MC fields when present."""

    messages: tuple[tuple[str, str], ...]
    answer: str
    choices: tuple[str, ...] = ()
    answer_index: int = -1


@dataclass
class Encoded:
    """Token ids of a dataset part, ready for batching."""

    prompts: list[list[int]]
    answers: list[list[int]]
    answer_texts: list[str]
    choice_ids: list[list[int]] = field(default_factory=list)
    answer_index: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def _fail(path: Path, problem: str) -> InputError:
    return InputError(f"dataset {path}: {problem}")


def load_examples(path: Path) -> list[Example]:
    """Parse a ShareGPT or multiple-choice JSON file; one-line InputError naming the file otherwise."""
    if not path.is_file():
        raise _fail(path, "file not found")
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise _fail(path, "expected a JSON list of items")
    if not data:
        raise _fail(path, "is empty")
    return [_parse_item(path, i, item) for i, item in enumerate(data)]


def _parse_item(path: Path, index: int, item: Any) -> Example:
    if isinstance(item, dict) and "conversation" in item:
        conv = item["conversation"]
        ok = (
            isinstance(conv, list)
            and conv
            and all(
                isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str)
                for t in conv
            )
        )
        if not ok or len(conv) < 2:
            raise _fail(path, f"item {index}: 'conversation' must list >= 2 turns with 'from' and 'value'")
        if ROLE_OF.get(conv[-1]["from"]) != "assistant":
            raise _fail(
                path,
                f"item {index}: the last turn must be the assistant's answer ('gpt'), not "
                f"{conv[-1]['from']!r}",
            )
        messages, answer = sharegpt_to_messages(conv)
        return Example(tuple((m["role"], m["content"]) for m in messages), answer)
    if isinstance(item, dict) and {"question", "choices", "answer"} <= item.keys():
        choices = item["choices"]
        answer = item["answer"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise _fail(path, f"item {index}: 'choices' must list 2..26 options")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise _fail(path, f"item {index}: 'answer' must be the index of a choice")
        prompt = render_choices(str(item["question"]), [str(c) for c in choices])
        return Example((("user", prompt),), LETTERS[answer], tuple(str(c) for c in choices), answer)
    raise _fail(
        path, f"item {index}: neither ShareGPT ('conversation') nor multiple-choice (question/choices/answer)"
    )


def split_examples(
    examples: list[Example], held_out: float, split: Split, samples: int | None, test: float = 0.0
) -> list[Example]:
    """The search, held-out or test part, capped at ``samples``: [search | held-out | test] in file order,
    the test part the last ceil(test * n) items and the held-out part the ceil(held_out * n) before it."""
    n = len(examples)
    n_test = _part_size(test, n)
    n_held = _part_size(held_out, n)
    n_search = n - n_test - n_held
    bounds = {"search": (0, n_search), "held_out": (n_search, n - n_test), "test": (n - n_test, n)}
    start, stop = bounds[split]
    part = examples[max(0, start) : max(0, stop)]
    return part[:samples] if samples else part


def _part_size(fraction: float, n: int) -> int:
    return math.ceil(round(fraction * n, 9)) if fraction > 0 else 0


def encode(tokenizer: Any, examples: list[Example], path: Path) -> Encoded:
    """Encode examples with the tokenizer's chat template; MC items also get their letter token ids."""
    out = Encoded([], [], [])
    letter_ids = _letter_ids(tokenizer)
    for i, ex in enumerate(examples):
        messages = [{"role": r, "content": c} for r, c in ex.messages]
        answer_ids = encode_answer(tokenizer, ex.answer)
        content = [t for t in answer_ids if t != tokenizer.eos_token_id]
        if not content:
            raise _fail(path, f"item {i}: the answer {ex.answer!r} tokenizes to nothing")
        out.prompts.append(encode_prompt(tokenizer, messages))
        out.answers.append(answer_ids)
        out.answer_texts.append(ex.answer)
        if ex.choices:
            out.choice_ids.append(letter_ids[: len(ex.choices)])
            out.answer_index.append(ex.answer_index)
    return out


def _letter_ids(tokenizer: Any) -> list[int]:
    ids = []
    for letter in LETTERS:
        tok = tokenizer(letter, add_special_tokens=False)["input_ids"]
        ids.append(int(tok[0]) if tok else -1)
    return ids


def file_digest(path: Path) -> str:
    """sha256 of a dataset file (recorded in reports for provenance)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
