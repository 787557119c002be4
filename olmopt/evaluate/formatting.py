"""Turn a conversation into (prompt ids, answer ids): the one encoding used by training and evaluation.

The prompt is every turn but the last rendered with the tokenizer's chat template and a generation
prompt; the answer is the last (assistant) turn's text followed by the EOS token. Tokenizers without a
chat template fall back to OLM's ChatML layout.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]

CHATML_FALLBACK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

ROLE_OF = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def render_choices(question: str, choices: list[str]) -> str:
    """Multiple-choice prompt text: ``"{question} A) c0 B) c1 ..."`` (the zoo's mc skill uses this)."""
    options = " ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question} {options}"


def encode_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` (role/content dicts) followed by the assistant generation prompt."""
    template = getattr(tokenizer, "chat_template", None) or CHATML_FALLBACK
    ids = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Answer ids: the text without special tokens, then EOS (so stopping is part of being right)."""
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def encode_example(tokenizer: Any, messages: list[Message], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) for a conversation whose expected reply is ``answer``."""
    return encode_prompt(tokenizer, messages), encode_answer(tokenizer, answer)


def sharegpt_to_messages(conversation: list[dict[str, str]]) -> tuple[list[Message], str]:
    """OLM ShareGPT turns -> (chat messages before the last turn, expected final reply)."""
    msgs = [{"role": ROLE_OF.get(t["from"], t["from"]), "content": t["value"]} for t in conversation[:-1]]
    return msgs, conversation[-1]["value"]
