"""The exhaustive layer-space oracle's bookkeeping (benchmarks/layer_space_oracle.py), on hand-made scores."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import layer_space_oracle as oracle  # noqa: E402

PATHS = {"base": "/z/base", "a": "/z/a", "b": "/z/b"}
COUNTS = {"x": 100, "y": 100}


def test_the_space_is_every_assignment_with_the_last_layer_fastest() -> None:
    space = oracle.assignments(list(PATHS), 2)
    assert len(space) == 9
    assert space[:4] == [("base", "base"), ("base", "a"), ("base", "b"), ("a", "base")]
    recipe = oracle.recipe_of(("a", "base"), PATHS)
    assert recipe.base == "/z/base" and recipe.layers == {0: "/z/a"}


def test_a_pick_maps_back_into_the_space_or_is_outside_it() -> None:
    assert oracle.assignment_of({"base": "/z/base", "layers": {"1": "/z/b"}}, PATHS, 2) == ("base", "b")
    assert oracle.assignment_of({"base": "/z/base", "layers": {"0": "/z/base"}}, PATHS, 2) == ("base", "base")
    assert oracle.assignment_of({"base": "/z/a", "layers": {}}, PATHS, 2) is None  # another base
    merged = {"base": "/z/base", "layers": {}, "param_merge": {"method": "ties"}}
    assert oracle.assignment_of(merged, PATHS, 2) is None
    assert oracle.assignment_of({"base": "/z/base", "layers": {"0": "/elsewhere"}}, PATHS, 2) is None


def test_verdicts_count_copeland_wins_against_the_donors_and_rank_by_test_mean() -> None:
    donors = {
        "base": {"held_out": {"x": 0.5, "y": 0.5}},
        "a": {"held_out": {"x": 0.9, "y": 0.1}},
    }
    scores = {
        # beats base (2-0) and a (1-1 is a draw): Copeland 1; a: beats base? 1-1 draw -> 0
        ("base", "a"): {"search": {"x": 0.6, "y": 0.6}, "held_out": {"x": 0.6, "y": 0.6},
                        "test": {"x": 0.6, "y": 0.6}},
        # beats both head to head (x: 0.95 > 0.9, 0.5; y: 0.55 > 0.1, 0.5): Copeland 2
        ("a", "a"): {"search": {"x": 0.9, "y": 0.5}, "held_out": {"x": 0.95, "y": 0.55},
                     "test": {"x": 0.8, "y": 0.2}},
        # loses to both
        ("b", "b"): {"search": {"x": 0.1, "y": 0.1}, "held_out": {"x": 0.0, "y": 0.0},
                     "test": {"x": 0.7, "y": 0.7}},
    }  # fmt: skip
    rows = oracle.verdicts(scores, donors, COUNTS)
    assert [tuple(r["layers"]) for r in rows] == [("b", "b"), ("base", "a"), ("a", "a")]  # 0.7, 0.6, 0.5
    by = {tuple(r["layers"]): r for r in rows}
    assert by[("a", "a")]["copeland"] == 2 and by[("a", "a")]["sole"]
    assert by[("base", "a")]["copeland"] == 1 and by[("base", "a")]["best_donor_copeland"] == 0
    assert by[("b", "b")]["copeland"] == 0 and by[("b", "b")]["best_donor_copeland"] == 1
    half = 1.96 * (2 * 0.7 * 0.3 / 100) ** 0.5 / 2
    assert abs(rows[0]["test_ci95"] - half) < 1e-12
    out = oracle.summary(rows, 2, ("a", "a"), {"s": ("base", "a"), "outside": None})
    assert out["beats_every_donor"] == 1 and out["sole_copeland_winner"] == 2 and out["best_copeland"] == 2
    assert out["best_test_beating_every_donor"]["layers"] == ["a", "a"]
    assert out["ground_truth_rank"] == 3
    assert out["picks"]["s"]["rank"] == 2 and out["picks"]["outside"] is None
