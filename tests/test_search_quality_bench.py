"""benchmarks/search_quality.py: the seed aggregation, its t interval, zoo arguments (hand computations)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "search_quality.py"


@pytest.fixture(scope="module")
def sq() -> ModuleType:
    spec = importlib.util.spec_from_file_location("search_quality", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_t_interval(sq: ModuleType) -> None:
    # two values: mean 0.5, sd 0.1414, t(0.975, 1) = 12.706 -> 12.706 * 0.1414 / sqrt(2) = 1.2706
    mean, half = sq.t_interval([0.4, 0.6])
    assert mean == pytest.approx(0.5) and half == pytest.approx(1.2706, abs=1e-4)
    # three values: sd 0.1, t(0.975, 2) = 4.3027 -> 4.3027 * 0.1 / sqrt(3) = 0.2484
    mean, half = sq.t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half == pytest.approx(0.2484, abs=1e-4)
    assert sq.t_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.0))
    mean, half = sq.t_interval([0.42])
    assert mean == 0.42 and math.isnan(half)


def _row(strategy: str, seed: int, mean: float, layers: dict[str, str], gap: float | None) -> dict[str, Any]:
    return {
        "family": "zoo-x", "budget": 100, "strategy": strategy, "seed": seed, "accepted": False,
        "test_mean": mean, "test_ci95": 0.02 + seed / 100, "test": {"add": mean, "rev": 1 - mean},
        "held_out_copeland": 3 + seed, "held_out_copeland_best_donor": 4, "gap_closed": gap,
        "evaluations": 100 + seed, "held_out_checks": 2, "wall_s": 10.0 * (seed + 1),
        "best_single_test_mean": 0.4, "ground_truth_test_mean": 0.6, "recipe": {"layers": layers},
    }  # fmt: skip


def test_aggregate_over_seeds(sq: ModuleType) -> None:
    rows = [
        _row("joint", 0, 0.5, {"0": "a"}, 0.5),
        _row("greedy", 0, 0.45, {"1": "b"}, None),
        _row("joint", 1, 0.6, {"0": "b"}, 1.0),
        _row("greedy", 1, 0.45, {"1": "b"}, None),
    ]
    joint, greedy = sq.aggregate(rows)
    assert (joint["strategy"], joint["seeds"], joint["same_recipe"]) == ("joint", [0, 1], False)
    assert joint["test_mean"] == pytest.approx(0.55)
    assert joint["seed_ci95"] == pytest.approx(12.706 * 0.0707107 / 2**0.5, abs=1e-4)  # = 0.6353
    assert joint["test_ci95"] == pytest.approx(0.025)  # the mean single-run half-width
    assert joint["test"] == pytest.approx({"add": 0.55, "rev": 0.45})
    assert joint["gap_closed"] == pytest.approx(0.75)
    assert (joint["held_out_copeland"], joint["evaluations"], joint["wall_s"]) == (3.5, 100.5, 15.0)
    assert greedy["same_recipe"] and greedy["seed_ci95"] == 0.0 and greedy["gap_closed"] is None
    assert joint["accepted"] is False


def test_render_marks_acceptance_and_seeds(sq: ModuleType, tmp_path: Path) -> None:
    rows = [_row("joint", 0, 0.5, {"0": "a"}, 0.5), _row("joint", 1, 0.5, {"0": "a"}, 0.5)]
    meta = {
        "machine": "some CPU", "jobs": 2, "seeds": 2, "campaigns": 2, "wall_s": 61.2,
        "load_start": 1.0, "load_end": 2.0, "complete": False,
    }  # fmt: skip
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    text = sq.render([str(path)])
    assert "total wall 61 s, stopped before the end (2 campaigns finished)" in text
    assert "**zoo-x** [NOT accepted" in text
    assert "| joint | 2 (same merge) | 0.500 ± 0.000 | 0.025 |" in text
    assert "| +3.5 (+4) | +0.50 | 100.5 (+2) | 15 s |" in text
    path.write_text(json.dumps(rows[:1]))  # an older result file: a bare list, one seed
    assert "| joint | 1 | 0.500 ± n/a | 0.020 |" in sq.render([str(path)])


def test_zoo_argument(sq: ModuleType) -> None:
    assert sq.zoo_arg("/z/zoo-small=100,300") == (Path("/z/zoo-small"), [100, 300])
    assert sq.zoo_arg("/z/zoo-small") == (Path("/z/zoo-small"), None)
    assert sq.zoo_arg("/z/a=b") == (Path("/z/a=b"), None)  # not budgets: part of the name
    assert sq.zoo_arg("/z/a=0") == (Path("/z/a=0"), None)


def test_targets(sq: ModuleType) -> None:
    s = {"strategy": "default", "best_single_test_mean": 0.4, "ground_truth_test_mean": 0.6}
    # 0.58 / 0.6 = 97 % of the recipe, above the donor's 0.4, beats all 5 donors
    assert sq.targets({**s, "test_mean": 0.58, "held_out_copeland": 5, "donors": 5}) == (
        "default: >= 95 % of the recipe met (97%); above the best donor met; beats every donor on held-out "
        "Copeland met"
    )
    # 0.56 / 0.6 = 93 %; a mean Copeland of 4.5 over seeds: one seed did not beat every donor
    text = sq.targets({**s, "test_mean": 0.56, "held_out_copeland": 4.5, "donors": 5})
    assert "recipe missed (93%); above the best donor met;" in text and text.endswith("Copeland missed")
    # the recipe below the best donor: no room to be above it; how far the merge is from it is said
    low = {**s, "ground_truth_test_mean": 0.3, "test_mean": 0.39, "held_out_copeland": 5}
    assert (
        "met (130%); above the best donor n/a (recipe below the best donor; the merge -0.010 from it);"
        in sq.targets(low)
    )


def test_targets_say_what_the_ground_truth_recipe_scores_on_held_out_copeland(sq: ModuleType) -> None:
    s = {"strategy": "default", "best_single_test_mean": 0.5, "ground_truth_test_mean": 0.57, "donors": 5}
    text = sq.targets({**s, "test_mean": 0.57, "held_out_copeland": 4, "ground_truth_held_out_copeland": 4})
    assert text.endswith("held-out Copeland missed (the ground-truth recipe: +4, missed)")
    text = sq.targets({**s, "test_mean": 0.57, "held_out_copeland": 5, "ground_truth_held_out_copeland": 5})
    assert text.endswith("held-out Copeland met (the ground-truth recipe: +5, met)")


def test_targets_add_the_same_copeland_count_on_the_sealed_test_split(sq: ModuleType) -> None:
    s = {"strategy": "default", "best_single_test_mean": 0.5, "ground_truth_test_mean": 0.57, "donors": 5}
    row = {
        **s,
        "test_mean": 0.57,
        "held_out_copeland": 4,
        "test_copeland": 5,
        "ground_truth_test_copeland": 3,
    }
    text = sq.targets(row)
    assert text.endswith("Copeland missed; on the sealed test split +5, met (the ground-truth recipe: +3)")
    # a mean over seeds keeps its decimal; one seed below 5 misses
    assert "test split +4.5, missed" in sq.targets({**row, "test_copeland": 4.5})


def test_main_job_strategy_is_the_study_file_at_the_budget(sq: ModuleType) -> None:
    """`main-job` runs studies/zoo.yaml's decisions as they are (its base decision and merge challenge
    too) and pays the base stage's evaluations (one per pool model), the challenge's (the study file's 30,
    at most 30 % of the budget) and the polish sweeps out of the joint stage's budget; `main-job-layers`
    is the same without the challenge."""
    import yaml

    study = yaml.safe_load((SCRIPT.parents[1] / "studies" / "zoo.yaml").read_text())
    plans = sq.strategies(100, 6, 5)
    main, default = plans["main-job"], plans["default"]
    challenge = study["decisions"]["merge"]
    assert challenge["mode"] == "challenge" and challenge["n_trials"] == 30
    assert main["_decisions"] == {"base": study["decisions"]["base"], "merge": challenge}
    assert "_decisions" not in default  # every other strategy keeps the benchmark's fixed base
    polish = int(study["decisions"]["layers"].get("polish", 0)) * 6 * 4  # 6 layers, 4 other donors each
    assert default["n_trials"] == 100 - polish and main["n_trials"] == 100 - 5 - 30 - polish
    quick = sq.strategies(40, 4, 5)["main-job"]  # a small budget: the joint stage keeps its 10 trials
    assert quick["_decisions"]["merge"]["n_trials"] == 40 - 5 - 16 - 10 and quick["n_trials"] == 10
    large = sq.strategies(300, 6, 5)["main-job"]  # ... and the study file's 30 trials of a large one
    assert large["_decisions"]["merge"]["n_trials"] == 30 and large["n_trials"] == 300 - 5 - 30 - polish
    assert study["decisions"]["base"] == {
        "mode": "auto", "lookahead": 2, "switch_confidence": 0.8, "own_union": True
    }  # fmt: skip
    # the main job of session 28: its lookahead without the union of own layers
    s28 = {**main["_decisions"], "base": {**study["decisions"]["base"], "own_union": False}}
    assert plans["main-job-s28"] == {**main, "_decisions": s28}
    before = plans["main-job-no-lookahead"]  # the main job before session 25: the same budget
    assert before == {**main, "_decisions": {**main["_decisions"], "base": {"mode": "auto"}}}
    # the main job of sessions 19-22 (session 21's Intel file): whole-model warm starts, no lookahead
    assert plans["main-job-s22"] == {**before, "warm_blocks": 1, "warm_own": False}
    assert main["warm_blocks"] == 2 and main["warm_own"] is True
    # the main job of session 27: no own-layer starts, the lookahead's switch at the selection's level
    s27 = {**main["_decisions"], "base": {"mode": "auto", "lookahead": 2}}
    assert plans["main-job-s27"] == {**main, "warm_own": False, "_decisions": s27}
    layers_only = plans["main-job-layers"]
    assert layers_only["_decisions"] == {"base": study["decisions"]["base"], "merge": {"mode": "off"}}
    assert layers_only["n_trials"] == 100 - 5 - polish
    assert main["_selection"] == default["_selection"] == study["selection"]
    assert "main-job" in sq.QUICK
    boundary = plans["main-job+boundary"]  # each polish sweep also tries the 4 other boundary donors
    assert boundary["_decisions"] == {
        "base": study["decisions"]["base"],
        "merge": challenge,
        "boundary": {"mode": "joint"},
    }
    assert boundary["n_trials"] == main["n_trials"] - int(study["decisions"]["layers"].get("polish", 0)) * 4
    tied = plans["main-job+tied-boundary"]  # no polish-boundary stage: the main job's budget
    assert tied["_decisions"]["boundary"] == {"mode": "joint", "donors": "tied"}
    assert tied["n_trials"] == main["n_trials"]
    switch = plans["main-job+tied-switch"]  # the same budget, the boundary switch guarded
    assert switch["_decisions"]["boundary"] == {"mode": "joint", "donors": "tied", "switch": "significant"}
    assert switch["n_trials"] == main["n_trials"]
    spare = plans["main-job+spare-0.2"]  # the main job, with its own early-stopping setting
    assert {k: v for k, v in spare.items() if k != "_evaluation"} == main
    settings = spare["_evaluation"]
    assert sq.evaluation_section({}, settings) == {"early_stop": {"spare_level": 0.2}}
    on = {"early_stop": {"mode": "on"}, "racing": {"mode": "off"}}
    assert sq.evaluation_section(on, settings) == {
        "early_stop": {"mode": "on", "spare_level": 0.2},
        "racing": {"mode": "off"},
    }
    assert sq.evaluation_section(None, settings) == sq.FULL_EVALUATIONS  # full evaluation stops nothing


def test_overview_pairs_every_strategy_with_the_main_job(sq: ModuleType) -> None:
    """Two families, two seeds. x - main-job per campaign: +0.02, 0, -0.02, +0.04: mean +0.01, sd
    sqrt(0.002 / 3) = 0.02582, half-width t(0.975, 3) 3.1824 x 0.02582 / 2 = 0.0411. Family b's recipe
    0.64 (95 %: 0.608) is missed at 0.60 and 0.58: 3 of 4 campaigns meet the targets on each side; one
    campaign of x beats all five donors on held-out Copeland (the others +4); family b's recipe does too,
    so the bracket counts family b's two campaigns of each strategy."""
    b = {
        "family": "zoo-b", "ground_truth_test_mean": 0.64, "best_single_test_mean": 0.55,
        "ground_truth_held_out_copeland": 5.0,
    }  # fmt: skip
    rows = [
        _campaign("main-job", 0, 0.48), _campaign("main-job", 1, 0.50),
        _campaign("main-job", 0, 0.60, **b), _campaign("main-job", 1, 0.62, **b),
        _campaign("x", 0, 0.50), _campaign("x", 1, 0.50),
        _campaign("x", 0, 0.58, **b), _campaign("x", 1, 0.66, **b, held_out_copeland=5.0),
    ]  # fmt: skip
    lines = sq.overview(rows)
    assert (
        "| strategy | zoo-x | zoo-b | mean | against main-job (95 % t) | targets met "
        "| held-out Copeland against every donor (where the recipe does) |"
    ) in lines
    assert "| x | 0.500 | 0.620 | 0.560 | +0.0100 ± 0.0411 | 3 of 4 | 1 of 4 (1 of 2) |" in lines
    assert "| main-job | 0.490 | 0.610 | 0.550 |  | 3 of 4 | 0 of 4 (0 of 2) |" in lines
    assert lines.index(
        "| x | 0.500 | 0.620 | 0.560 | +0.0100 ± 0.0411 | 3 of 4 | 1 of 4 (1 of 2) |"
    ) < lines.index("| main-job | 0.490 | 0.610 | 0.550 |  | 3 of 4 | 0 of 4 (0 of 2) |")  # best mean first
    assert sq.overview(rows[:2] + rows[4:6]) == []  # one family: the per-family table says it all
    assert sq.overview(rows[4:]) == []  # no main job to pair with


def _campaign(strategy: str, seed: int, mean: float, **extra: Any) -> dict[str, Any]:
    row = {
        "family": "zoo-x", "budget": 100, "strategy": strategy, "seed": seed, "test_mean": mean,
        "ground_truth_test_mean": 0.50, "best_single_test_mean": 0.45, "held_out_copeland": 4.0, "donors": 5,
        "items": 1000,
    }  # fmt: skip
    return {**row, **extra}


def test_compare_pairs_campaigns_and_counts_targets(tmp_path: Path) -> None:
    """Three campaigns paired by seed across two strategies: differences +0.02, +0.04, -0.01, mean
    0.0167, sd 0.02517, t(0.975, 2) = 4.3027 -> half-width 4.3027 * 0.02517 / sqrt(3) = 0.0625."""
    import subprocess
    import sys

    script = SCRIPT.parent / "compare_search_quality.py"
    a = [_campaign("main-job", s, m) for s, m in enumerate([0.46, 0.47, 0.44])]
    b = [_campaign("other", s, m, items=1500) for s, m in enumerate([0.48, 0.51, 0.43])]
    b[1]["held_out_copeland"] = 5.0
    for row in (a[1], b[1], b[2]):  # where the recipe beats every donor too: seeds 1 and 2
        row["ground_truth_held_out_copeland"] = 5.0
    b.append(_campaign("other", 7, 0.9))  # no twin in A: left out
    (tmp_path / "a.json").write_text(json.dumps({"meta": {}, "rows": a}))
    (tmp_path / "b.json").write_text(json.dumps({"meta": {}, "rows": b}))
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a.json"), str(tmp_path / "b.json")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == (
        "3 campaigns paired; test mean B - A +0.0167 ± 0.0625 (95 % t); better in 2, worse in 1; "
        "item evaluations B / A 1.50"
    )
    # recipe 0.50 > best donor 0.45: >= 0.475 is 95 % of it; above the donor means > 0.45
    assert lines[1] == (
        "A (main-job): >= 95 % of the recipe 0/3; above the best donor where the recipe is 2/3; "
        "never below it elsewhere 0/0; held-out Copeland against every donor 0/3 (0/1 where the "
        "ground-truth recipe beats every donor too)"
    )
    assert lines[2].startswith(
        "B (other): >= 95 % of the recipe 2/3; above the best donor where the recipe is 2/3"
    )
    assert lines[2].endswith(
        "held-out Copeland against every donor 1/3 (1/2 where the ground-truth recipe beats every donor too)"
    )
    assert lines[3] == "  zoo-x budget 100 seed 0: 0.460 -> 0.480 (best donor 0.450, recipe 0.500)"
    # a side of several files: B's rows split over two files (seed 1 in both) pair as before
    (tmp_path / "b1.json").write_text(json.dumps({"meta": {}, "rows": b[:2]}))
    (tmp_path / "b2.json").write_text(json.dumps({"meta": {}, "rows": b[1:]}))
    both = f"{tmp_path / 'b1.json'},{tmp_path / 'b2.json'}"
    split = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "a.json"), both],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert split.returncode == 0 and split.stdout == run.stdout, split.stderr
    b[1]["test_mean"] = 0.2  # the same campaign with another result in the other file of the side
    (tmp_path / "b2.json").write_text(json.dumps({"meta": {}, "rows": b[1:]}))
    # one line and exit 2: a missing file, nothing to pair, a campaign with two results on one side
    for argv, needle in (
        ([str(tmp_path / "missing.json"), str(tmp_path / "b.json")], "not a search_quality.py result file"),
        ([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--b-strategy", "nope"], "no campaign of A"),
        ([str(tmp_path / "a.json"), both], "another test mean"),
    ):
        bad = subprocess.run(
            [sys.executable, str(script), *argv], capture_output=True, text=True, check=False
        )
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr
    # both vendors on one side: the same family name trained on AMD and on Intel is two campaigns
    # (a pinned seed trains other weights on the other vendor's CPUs); A AMD seed 0 0.46 and Intel seed 0
    # 0.40, B +0.02 and +0.06: mean +0.04, sd 0.02828, t(0.975, 1) = 12.706 -> 12.706 * 0.02 = 0.2541
    files = {
        "a-amd": ("AMD EPYC, 2 cores", [a[0]]),
        "a-intel": ("Intel(R) Xeon(R), 2 cores", [{**a[0], "test_mean": 0.40}]),
        "b-amd": ("AMD EPYC", [b[0]]),
        "b-intel": ("", [{**b[0], "test_mean": 0.46}]),
    }
    for name, (machine, rows) in files.items():
        meta = {"machine": machine} if machine else {"runs": [{"machine": "Intel(R) Xeon(R)"}]}  # merged
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    pooled = subprocess.run(
        [sys.executable, str(script), *(f"{tmp_path / (s + '-amd.json')},{tmp_path / (s + '-intel.json')}"
                                        for s in "ab")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert pooled.returncode == 0, pooled.stderr
    lines = pooled.stdout.splitlines()
    assert lines[0].startswith("2 campaigns paired; test mean B - A +0.0400 ± 0.2541 (95 % t); better in 2")
    assert lines[3:] == [
        "  AMD zoo-x budget 100 seed 0: 0.460 -> 0.480 (best donor 0.450, recipe 0.500)",
        "  Intel zoo-x budget 100 seed 0: 0.400 -> 0.460 (best donor 0.450, recipe 0.500)",
    ]
