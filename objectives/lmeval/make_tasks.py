"""Regenerate the data files of the shipped lm-eval task set from the zoo's objectives (committed).

Usage: python objectives/lmeval/make_tasks.py

``zoo_mc.jsonl``: the mc skill (``../mc_choices.json``) with the prompt rendered as the zoo renders it
(``larger? A) 864 B) 938``), the choice letters and the answer index; ``zoo_add.jsonl``: the add skill
(``../add.json``) as prompt and answer. Item i is item i of the source file.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mc_rows(items: list[dict]) -> list[dict]:
    rows = []
    for item in items:
        options = " ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(item["choices"]))
        rows.append(
            {"question": f"{item['question']} {options}", "choices": list(LETTERS[: len(item["choices"])]), "answer": item["answer"]}
        )
    return rows


def generate_rows(items: list[dict]) -> list[dict]:
    return [{"prompt": i["conversation"][-2]["value"], "answer": i["conversation"][-1]["value"]} for i in items]


def write(name: str, rows: list[dict]) -> Path:
    path = HERE / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


if __name__ == "__main__":
    src = HERE.parent
    print(write("zoo_mc.jsonl", mc_rows(json.loads((src / "mc_choices.json").read_text()))))
    print(write("zoo_add.jsonl", generate_rows(json.loads((src / "add.json").read_text()))))
