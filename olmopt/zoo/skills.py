"""The zoo's synthetic skills: item generators, the fixed fact table and the shipped objective sets.

Every item is a ``(prompt, answer)`` pair of plain text. The objective (evaluation) items are generated from
``OBJECTIVE_SEED`` and shipped in ``objectives/``; training pools exclude their keys for add, rev and mc.
fact is memorisation: the table itself is the skill, so its objective items are the table's entries.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from olmopt.evaluate.formatting import render_choices

Item = tuple[str, str]

SKILLS = ("add", "rev", "fact", "mc")
OBJECTIVE_SEED = 20261122
FACT_TABLE_SEED = 7
OBJECTIVE_ITEMS = 200
N_FACTS = 200
MC_QUESTION = "larger?"
CONSONANTS = "bcdfghjklmnprstvz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class Skill:
    """One skill: its name, a one-line description and an example item."""

    name: str
    description: str
    example: Item


def add_item(rng: random.Random) -> Item:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}=", str(a + b)


def rev_item(rng: random.Random) -> Item:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 8)))
    return f"rev {word}", word[::-1]


def mc_question(rng: random.Random) -> tuple[str, list[str], int]:
    """Two distinct numbers <= 999; the answer is the index of the larger."""
    a, b = rng.sample(range(1000), 2)
    return MC_QUESTION, [str(a), str(b)], 0 if a > b else 1


def mc_item(rng: random.Random) -> Item:
    question, choices, answer = mc_question(rng)
    return render_choices(question, choices), "AB"[answer]


def fact_table() -> list[Item]:
    """200 made-up CVCVC names -> 3 capital letters, fixed for every zoo (``code of bajel?`` -> ``JIH``)."""
    rng = random.Random(FACT_TABLE_SEED)
    names: dict[str, str] = {}
    while len(names) < N_FACTS:
        name = "".join(rng.choice(CONSONANTS if i % 2 == 0 else VOWELS) for i in range(5))
        if name not in names:
            names[name] = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(3))
    return [(f"code of {name}?", code) for name, code in names.items()]


GENERATORS: dict[str, Callable[[random.Random], Item]] = {"add": add_item, "rev": rev_item, "mc": mc_item}

SKILL_INFO = {
    "add": Skill("add", "2-digit addition (10..99 + 10..99)", ("12+34=", "46")),
    "rev": Skill("rev", "reverse a word of 4-8 lowercase letters", ("rev abcd", "dcba")),
    "fact": Skill("fact", "recall a fixed table of 200 made-up names -> 3-letter codes", fact_table()[0]),
    "mc": Skill(
        "mc", "multiple choice: which of two numbers <= 999 is larger", (f"{MC_QUESTION} A) 17 B) 42", "B")
    ),
}


def _unique(
    rng: random.Random, make: Callable[[random.Random], Item], n: int, exclude: set[str]
) -> list[Item]:
    items: dict[str, str] = {}
    while len(items) < n:
        prompt, answer = make(rng)
        if prompt not in exclude and prompt not in items:
            items[prompt] = answer
    return list(items.items())


def objective_mc_questions() -> list[tuple[str, list[str], int]]:
    """The shipped mc questions (question, choices, answer index), in shipped order."""
    rng = random.Random(OBJECTIVE_SEED + 3)
    seen: set[tuple[str, ...]] = set()
    out: list[tuple[str, list[str], int]] = []
    while len(out) < OBJECTIVE_ITEMS:
        q, choices, answer = mc_question(rng)
        if tuple(choices) not in seen:
            seen.add(tuple(choices))
            out.append((q, choices, answer))
    return out


def objective_items(skill: str) -> list[Item]:
    """The shipped evaluation items of ``skill`` (shuffled; the last 25 % are the held-out part)."""
    if skill == "fact":
        table = fact_table()
        random.Random(OBJECTIVE_SEED).shuffle(table)
        return table[:OBJECTIVE_ITEMS]
    if skill == "mc":
        return [(render_choices(q, c), "AB"[a]) for q, c, a in objective_mc_questions()]
    offset = SKILLS.index(skill)
    return _unique(random.Random(OBJECTIVE_SEED + offset), GENERATORS[skill], OBJECTIVE_ITEMS, set())


POOL_SIZES = {"rev": 4000, "mc": 4000}


def training_pool(skill: str, rng: random.Random) -> list[Item]:
    """Training items of ``skill``: disjoint from the objective items except for fact (the table)."""
    if skill == "fact":
        return fact_table()
    if skill == "add":  # every 2-digit pair but the objective ones, shuffled
        held = {prompt for prompt, _ in objective_items("add")}
        pairs = [(f"{a}+{b}=", str(a + b)) for a in range(10, 100) for b in range(10, 100)]
        pool = [item for item in pairs if item[0] not in held]
        rng.shuffle(pool)
        return pool
    exclude = {prompt for prompt, _ in objective_items(skill)}
    return _unique(rng, GENERATORS[skill], POOL_SIZES[skill], exclude)
