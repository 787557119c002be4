"""The shipped evaluation sets (``objectives/``): writing them, reading them back, search/held-out split."""

from __future__ import annotations

import json
import math
from pathlib import Path

from olmopt.errors import InputError
from olmopt.evaluate.formatting import sharegpt_to_messages
from olmopt.zoo.skills import SKILLS, Item, objective_items, objective_mc_questions

OBJECTIVES_DIR = Path(__file__).resolve().parents[2] / "objectives"
HELDOUT_FRACTION = 0.25
MC_CHOICES_FILE = "mc_choices.json"


def objective_file(skill: str) -> str:
    """File name of a skill's ShareGPT set, e.g. ``add.json``."""
    return f"{skill}.json"


def write_objectives(directory: Path = OBJECTIVES_DIR) -> list[Path]:
    """(Re)write the ShareGPT file of every skill and the mc multiple-choice file; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for skill in SKILLS:
        data = [
            {"conversation": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]}
            for p, a in objective_items(skill)
        ]
        written.append(_dump(directory / objective_file(skill), data))
    choices = [{"question": q, "choices": c, "answer": a} for q, c, a in objective_mc_questions()]
    written.append(_dump(directory / MC_CHOICES_FILE, choices))
    return written


def _dump(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def load_objective(skill: str, directory: Path = OBJECTIVES_DIR) -> list[Item]:
    """(prompt, answer) items of a shipped ShareGPT file; generated in memory when not shipped alongside."""
    path = directory / objective_file(skill)
    if not path.is_file():
        return objective_items(skill)
    try:
        data = json.loads(path.read_text())
        items = []
        for row in data:
            messages, answer = sharegpt_to_messages(row["conversation"])
            items.append((messages[-1]["content"], answer))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise InputError(f"objective file {path}: not ShareGPT JSON ({exc})") from None
    return items


def split(items: list[Item], fraction: float = HELDOUT_FRACTION) -> tuple[list[Item], list[Item]]:
    """(search part, held-out part): the held-out part is the last ``ceil(fraction * n)`` items."""
    n_held = math.ceil(fraction * len(items))
    return items[: len(items) - n_held], items[len(items) - n_held :]
