"""The acceptance criteria every generated zoo family is checked against (on the search split)."""

from __future__ import annotations

from statistics import mean
from typing import Any

from olmopt.errors import OlmoptError

OWN_MARGIN = 0.05  # a specialist beats every other model on its skill by this much, or by half the gap to 1


def clear_margin(rival: float) -> float:
    """How far above the best rival a specialist must be:
    0.05, or half the room left when the rival is near 1."""
    return min(OWN_MARGIN, (1.0 - rival) / 2)


BASE_BAND = (0.2, 0.8)  # the base's average exact match: mediocre, so merging has room


class AcceptanceError(OlmoptError):
    """A built zoo that fails its acceptance criteria (exit
    status 1; the zoo is kept and zoo.json says why)."""

    exit_code = 1


Scores = dict[str, dict[str, float]]  # model -> skill -> exact match (search split)


def _criterion(name: str, description: str, failures: list[str], ok_detail: str) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "passed": not failures,
        "detail": "; ".join(failures) if failures else ok_detail,
    }


def check(scores: Scores, specialists: dict[str, str], recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluate the criteria. ``specialists``: name -> skill;
    ``recipe``: the layer recipe's skills and scores."""
    skills = list(scores["base"])
    own, forget = [], []
    for name, skill in specialists.items():
        rivals = {m: s[skill] for m, s in scores.items() if m != name and m != "layer_recipe"}
        best_rival = max(rivals, key=lambda m: rivals[m])
        if scores[name][skill] < rivals[best_rival] + clear_margin(rivals[best_rival]):
            own.append(f"{name} {skill}={scores[name][skill]:.3f} vs {best_rival} {rivals[best_rival]:.3f}")
        if not any(scores[name][k] < scores["base"][k] for k in skills if k != skill):
            forget.append(f"{name} is not below the base on any other skill")
    base_avg = mean(scores["base"].values())
    band = [] if BASE_BAND[0] <= base_avg <= BASE_BAND[1] else [f"base average {base_avg:.3f}"]
    low, up = recipe["lower_skill"], recipe["upper_skill"]
    r, b = recipe["scores"], scores["base"]
    combine = [f"recipe {k}={r[k]:.3f} not above base {b[k]:.3f}" for k in (low, up) if r[k] <= b[k]]
    for skill, other in ((low, recipe["upper_model"]), (up, recipe["lower_model"])):
        if r[skill] <= scores[other][skill]:
            combine.append(f"recipe {skill}={r[skill]:.3f} not above {other} {scores[other][skill]:.3f}")
    return [
        _criterion(
            "own_skill_best",
            f"each specialist beats every other model on its skill by min({OWN_MARGIN}, half the gap to 1)",
            own,
            "every specialist is best on its own skill",
        ),
        _criterion(
            "forgetting",
            "each specialist is below the base on at least one other skill",
            forget,
            "every specialist forgets elsewhere",
        ),
        _criterion(
            "base_mediocre",
            f"base average exact match within {BASE_BAND}",
            band,
            f"base average {base_avg:.3f}",
        ),
        _criterion(
            "layer_recipe_combines",
            "base + lower layers of the lower specialist + upper layers of the upper specialist beats the "
            "base on both skills, and each layer specialist on the other one's skill",
            combine,
            f"recipe {low}={r[low]:.3f}, {up}={r[up]:.3f}",
        ),
    ]


def first_failure(criteria: list[dict[str, Any]]) -> str | None:
    """``"name: detail"`` of the first failed criterion, or None."""
    for c in criteria:
        if not c["passed"]:
            return f"{c['name']}: {c['detail']}"
    return None
