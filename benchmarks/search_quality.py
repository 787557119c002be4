"""Search quality: which campaign strategy finds the best layer-donor merge, at equal evaluation budgets.

    python benchmarks/search_quality.py [--zoo DIR[=B1,B2] ...] [--budget 100 [300 ...]] [--seeds 1]
                                        [--jobs 2] [--strategies a,b] [--quick]
                                        [--out storage/search-quality.json] [--render JSON ...]

For every zoo family (a directory built by ``olmopt zoo build``; missing ones are built with the pinned
seed named by the directory ``storage/zoo-SIZE-ARCH[-sSEED]``), every budget and every strategy, it runs
``--seeds K`` campaigns (``sampler.seed`` 0..K-1) on SQLite (base fixed to the pool's base but for
``main-job`` and ``main-job+boundary``, which decide it as studies/zoo.yaml does; objectives/zoo.yaml),
counts the evaluations each spent (trials that cost budget: not reused metrics, and held-out checks
separately) and scores its final Recipe on:

- the search and held-out parts of objectives/zoo.yaml (the campaign saw the first, checked the second);
- a **sealed test split** written by this script (``test_split``): 400 items per skill for add, rev and
  mc, drawn with their own seed and disjoint from every objective item; the 200-entry fact table for
  fact. Search and selection never read it. rev and mc items are new prompts (a few may occur in the
  specialists' training pools, < 1 %); add has only 8,100 prompts and the zoo trains on every one outside
  objectives/, so its test items are trained prompts, like fact's (both measure retained skill).

Per family, budget and strategy it reports the test mean with a 95 % confidence interval (normal
approximation over the items of all skills; with several seeds: the mean over seeds with a 95 % Student-t
interval across seeds, beside the mean single-run interval, and whether every seed ended on the same
merge), the per-skill test scores, held-out Copeland against the donors, the share of the gap closed
between the best single donor and the zoo's ground-truth layer recipe on the test mean, evaluations and
wall time; each family is marked accepted or not (zoo.json ``acceptance``). The ground truth (zoo.json
``layer_recipe``) only scores results: no strategy reads it.

``--budget`` takes several values; ``--zoo DIR=100,300`` gives one zoo its own budgets. ``--jobs N``
(default 2) runs N campaigns at once in spawned processes of one torch thread each (scoring stays in
this process); campaigns start seed by seed, then in the order of ``--zoo`` and its budgets, so a run
stopped early has whole tables for the first families of the first seed. The JSON (``--out``, rewritten
after every campaign) holds every seed's row and the run's machine, total wall time and whether it
finished; ``--render FILE ...`` prints the tables (with several families, an overview: every strategy
against the main job, paired by campaign).
``--quick``: the tiny llama family, budget 40, five strategies with the main job (target: under 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NoReturn

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEST_SEED = 20261205
TEST_ITEMS = 400
JOINT_FLOOR = 10  # the fewest trials a joint stage gets, whatever the budget
LOOKAHEAD_S27 = {"mode": "auto", "lookahead": 2}  # the base decision before session 28 (switch at 95 %)


def strategies(budget: int, n_layers: int, n_pool: int) -> dict[str, dict[str, Any]]:
    """Layer decisions of every strategy, sized to ``budget`` evaluations (greedy ones may spend less)."""
    sweep = n_layers * n_pool  # evaluations of one single-layer sweep (an upper bound: kept slots are reused)
    pairs = (n_layers - 1) * n_pool
    joint = {"mode": "joint", "n_trials": budget, "warm_start": False}
    return {
        "greedy-forward": {"mode": "greedy", "direction": "forward"},
        "greedy-backward": {"mode": "greedy", "direction": "backward"},
        "greedy-multipass": {"mode": "greedy", "passes": max(1, budget // sweep)},
        "block-swaps": {
            "mode": "greedy",
            "windows": [2, 3],
            "passes": max(1, budget // (pairs + (n_layers - 2) * n_pool)),
        },
        "joint-tpe": {**joint, "sampler": "tpe"},
        "joint-catcma": {**joint, "sampler": "catcma"},
        "joint-nsga2": {**joint, "sampler": "nsga2"},
        "joint-random": {**joint, "sampler": "random"},
        "joint-tpe-warm": {**joint, "sampler": "tpe", "warm_start": True},
        # the new default: pairs then single layers (one sweep each), then a warm-started joint search
        "blocks+joint": {
            "mode": "greedy",
            "windows": [2, 1],
            "then_joint": max(JOINT_FLOOR, budget - pairs - sweep),
            "sampler": "tpe",
        },
        # the same with the overfitting guard: the best held-out mean among the joint stage's top 5
        "blocks+joint+guard": {
            "mode": "greedy",
            "windows": [2, 1],
            "then_joint": max(JOINT_FLOOR, budget - pairs - sweep),
            "sampler": "tpe",
            "_selection": {"held_out_guard": 5},
        },
        "joint-tpe-warm+guard": {
            **joint,
            "sampler": "tpe",
            "warm_start": True,
            "_selection": {"held_out_guard": 5},
        },
        "joint-tpe-warm+mean": {
            **joint,
            "sampler": "tpe",
            "warm_start": True,
            "_selection": {"score": "mean"},
        },
        # the main job's layer decision (studies/zoo.yaml) at this budget: its polish sweeps are paid for
        # out of the joint stage's trials (an upper bound: candidates that repeat known weights are free)
        "default": default_at(budget, n_layers, n_pool),
        # the whole main job as `make demo` runs it: its base decision too (base auto: every pool model
        # evaluated, the best mean becomes the base), paid out of the joint stage's trials
        "main-job": main_job_at(budget, n_layers, n_pool),
        # the same with the boundary donor as one more slot of the joint stage (docs/strategies.md)
        "main-job+boundary": main_job_at(budget, n_layers, n_pool, boundary={"mode": "joint"}),
        # the same with only the boundaries tied with the base winner offered (no slot when there is one)
        "main-job+tied-boundary": main_job_at(
            budget, n_layers, n_pool, boundary={"mode": "joint", "donors": "tied"}
        ),
        # the same where the joint winner may leave the base winner's boundary only when significantly better
        # than the best candidate on it, on the search and held-out items together (switch: significant)
        "main-job+tied-switch": main_job_at(
            budget, n_layers, n_pool, boundary={"mode": "joint", "donors": "tied", "switch": "significant"}
        ),
        # the main job before session 25: its base decision without the lookahead (base.lookahead: 0, no
        # base-lookahead stage; measured as `main-job+lookahead` against this, BENCHMARKS.md)
        "main-job-no-lookahead": main_job_at(budget, n_layers, n_pool, base={"mode": "auto"}),
        # the main job without its merge challenge (the main job of sessions 7-18): the layer search alone
        "main-job-layers": main_job_at(budget, n_layers, n_pool, merge={"mode": "off"}),
        # the main job whose joint layer stage takes the challenge's trials when its budget ends on the
        # incumbent (decisions.merge.yield_to_layers; the challenge is then skipped)
        "main-job+yield": main_job_at(
            budget, n_layers, n_pool, merge={**challenge_decision(), "yield_to_layers": True}
        ),
        # the main job with its joint layer stage warm-started with whole models only (layers.warm_blocks:
        # 1; the lower and upper halves of each donor left out): before session 23, but with the lookahead
        "main-job-whole-starts": {
            **main_job_at(budget, n_layers, n_pool),
            "warm_blocks": 1,
            "warm_own": False,
        },
        # the main job of session 27, before own layers: no own-layer starts (layers.warm_own) and the
        # lookahead's switch at the selection's 95 % (base.switch_confidence); measured in session 28 as
        # `main-job+own+switch-0.8` against this (BENCHMARKS.md)
        "main-job-s27": {
            **main_job_at(budget, n_layers, n_pool, base=dict(LOOKAHEAD_S27)),
            "warm_own": False,
        },
        # the main job with own-layer starts but the lookahead's switch at 95 %: measured, not kept
        "main-job+own-switch-0.95": main_job_at(budget, n_layers, n_pool, base=dict(LOOKAHEAD_S27)),
        # the main job whose merge challenge replaces the layer merge only when significantly better on the
        # search and held-out items together (decisions.merge.switch_confidence), at 80 % and at 95 %
        "main-job+challenge-0.8": main_job_at(
            budget, n_layers, n_pool, merge={**challenge_decision(), "switch_confidence": 0.8}
        ),
        "main-job+challenge-0.95": main_job_at(
            budget, n_layers, n_pool, merge={**challenge_decision(), "switch_confidence": 0.95}
        ),
        # the main job of session 28, before its lookahead offered all partial fine-tunes' own layers together
        # on every other boundary they share (decisions.base.own_union); measured in session 29 as
        # `main-job+union` against this (BENCHMARKS.md)
        "main-job-s28": main_job_at(
            budget, n_layers, n_pool, base={**main_job_study()["decisions"]["base"], "own_union": False}
        ),
        # the main job of sessions 19-22, before both: whole-model warm starts only and no lookahead
        "main-job-s22": {
            **main_job_at(budget, n_layers, n_pool, base={"mode": "auto"}),
            "warm_blocks": 1,
            "warm_own": False,
        },
        # the main job whose TPE samplers start guided right after the joint stage's warm starts (the
        # incumbent and each pool model's whole model): no random start-up trials there (4 of 10 before);
        # measured in session 20: the main job's figures (BENCHMARKS.md)
        "main-job+startup-6": {**main_job_at(budget, n_layers, n_pool), "_sampler": {"n_startup_trials": 6}},
        # the main job with early stopping sparing only a lead that the sign test calls one at p <= 0.2
        # (evaluation.early_stop.spare_level; with --early-stop off it is the main job)
        "main-job+spare-0.2": {
            **main_job_at(budget, n_layers, n_pool),
            "_evaluation": {"early_stop": {"spare_level": 0.2}},
        },
        # a parameter-space merge stage first (its winner joins the layer stages as the donor @merge), then
        # the main job's layer decision: TIES / task arithmetic / DELLA with per-model weights, global
        # ("ps+layers") or per pair of adjacent layers ("ps-lw+layers"); the merge stage's trials come out
        # of the layer stage's budget
        "ps+layers": ps_then_layers(budget, n_layers, n_pool, budget * 2 // 5),
        "ps-lw+layers": ps_then_layers(budget, n_layers, n_pool, budget * 2 // 5, group_size=2),
        # the parameter-space merge alone (per-model weights per pair of layers), the whole budget
        "ps-lw": {
            "mode": "off",
            **{k: v for k, v in ps_then_layers(budget, n_layers, n_pool, budget, 2).items() if k[0] == "_"},
        },
        # the main job's layer decision on half the budget, then a joint search over tensor units (every
        # attention and MLP projection, embeddings and head; warm-started with each donor's whole model)
        "layers+units": {
            **default_at(budget // 2, n_layers, n_pool),
            "_decisions": {"tensors": {"mode": "joint", "n_trials": budget - budget // 2, "sampler": "tpe"}},
        },
    }


def polish_evaluations(slots: int, donors: int) -> int:
    """Evaluations of the main job's polish sweeps over ``slots`` slots of ``donors`` alternatives each
    (an upper bound: a sweep after one that changed nothing costs nothing)."""
    return int(main_job_layers().get("polish", 0)) * slots * donors


def default_at(budget: int, n_layers: int, n_pool: int) -> dict[str, Any]:
    """The main job's layer decision with ``budget`` evaluations in all (joint stage plus polish sweeps)."""
    polish = polish_evaluations(n_layers, n_pool - 1)
    return {**main_job_layers(), "n_trials": max(JOINT_FLOOR, budget - polish)}


def main_job_at(budget: int, n_layers: int, n_pool: int, **decisions: dict[str, Any]) -> dict[str, Any]:
    """Every decision of the main job (studies/zoo.yaml), ``decisions`` replacing or adding some (not the
    layers), with ``budget`` evaluations in all: the base decision (one evaluation per pool model), the
    merge challenge (the study file's ``n_trials``, at most 30 % of ``budget`` and never below the joint
    stage's floor of 10 trials: 30 at 100 and 300, 9 at 40 on a 4-layer family),
    and the layer decision with the rest (with every pool model's boundary searched in the joint stage,
    each polish sweep has one boundary stage more)."""
    others = {k: v for k, v in main_job_study()["decisions"].items() if k != "layers"} | decisions
    boundary_polish = 0
    boundary = others.get("boundary") or {}
    if boundary.get("mode") == "joint" and boundary.get("donors", "all") == "all":
        boundary_polish = polish_evaluations(1, n_pool - 1)
    merge = others.get("merge") or {}
    rest = budget - n_pool - boundary_polish
    if merge.get("mode") == "challenge":
        polish = polish_evaluations(n_layers, n_pool - 1)
        challenge = max(1, min(int(merge["n_trials"]), budget * 3 // 10, rest - polish - JOINT_FLOOR))
        others["merge"] = {**merge, "n_trials": challenge}
        rest -= challenge
    return {**default_at(rest, n_layers, n_pool), "_decisions": others}


def ps_then_layers(
    budget: int, n_layers: int, n_pool: int, merge_trials: int, group_size: int | None = None
) -> dict[str, Any]:
    """A merge stage of ``merge_trials`` evaluations, then the main job's layer decision with the rest of
    ``budget`` (its polish sweeps also offer the merge, one donor more per slot)."""
    rest = budget - merge_trials
    polish = polish_evaluations(n_layers, n_pool)
    merge: dict[str, Any] = {
        "mode": "joint",
        "methods": ["ties", "task_arithmetic", "della"],
        "n_trials": merge_trials,
        "group_size": group_size,
    }
    return {**main_job_layers(), "n_trials": max(JOINT_FLOOR, rest - polish), "_decisions": {"merge": merge}}


def main_job_study() -> dict[str, Any]:
    """studies/zoo.yaml, the main job (`make demo`), as parsed YAML."""
    return dict(yaml.safe_load((REPO / "studies" / "zoo.yaml").read_text()))


def challenge_decision() -> dict[str, Any]:
    """The merge challenge of the main job (studies/zoo.yaml)."""
    return dict(main_job_study()["decisions"]["merge"])


def main_job_layers() -> dict[str, Any]:
    """The layer decision and selection rules of the main job (studies/zoo.yaml)."""
    study = main_job_study()
    return {**study["decisions"]["layers"], "_selection": dict(study.get("selection") or {})}


QUICK = ["greedy-forward", "block-swaps", "joint-tpe", "default", "main-job"]


def test_split(directory: Path) -> dict[str, Path]:
    """Write the sealed test sets (ShareGPT / multiple choice JSON) and return skill -> file."""
    from olmopt.evaluate.formatting import render_choices
    from olmopt.zoo.skills import GENERATORS, fact_table, mc_question, objective_items, objective_mc_questions

    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(TEST_SEED)
    files: dict[str, Path] = {}
    for skill in ("add", "rev", "fact"):
        if skill == "fact":
            items = fact_table()
        else:
            seen = {p for p, _ in objective_items(skill)}
            items, prompts = [], set()
            while len(items) < TEST_ITEMS:
                prompt, answer = GENERATORS[skill](rng)
                if prompt not in seen and prompt not in prompts:
                    prompts.add(prompt)
                    items.append((prompt, answer))
        rows = [
            {"conversation": [{"from": "human", "value": p}, {"from": "gpt", "value": a}]} for p, a in items
        ]
        files[skill] = directory / f"{skill}.json"
        files[skill].write_text(json.dumps(rows))
    seen_mc = {render_choices(q, c) for q, c, _ in objective_mc_questions()}
    questions, prompts = [], set()
    while len(questions) < TEST_ITEMS:
        q, c, a = mc_question(rng)
        prompt = render_choices(q, c)
        if prompt not in seen_mc and prompt not in prompts:
            prompts.add(prompt)
            questions.append({"question": q, "choices": c, "answer": a})
    files["mc"] = directory / "mc_choices.json"
    files["mc"].write_text(json.dumps(questions))
    return files


def zoo_objectives() -> list[dict[str, Any]]:
    objs = yaml.safe_load((REPO / "objectives" / "zoo.yaml").read_text())["objectives"]
    return [dict(o, dataset=str(REPO / o["dataset"])) for o in objs]


def family(zoo: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(zoo.json, model name -> path), building the zoo when it is missing."""
    from olmopt.zoo import build_zoo, load_manifest

    if not (zoo / "zoo.json").is_file():
        parts = zoo.name.split(
            "-"
        )  # zoo-SIZE[-ARCH[-sSEED]] (zoo-tiny, zoo-small: the pinned llama families)
        arch = parts[2] if len(parts) > 2 else "llama"
        seed = int(parts[3][1:]) if len(parts) > 3 else None
        build_zoo(
            zoo, size=parts[1], arch=arch, seed=seed, progress=False, check=False
        )  # acceptance is reported
    manifest = load_manifest(zoo)
    return manifest, {m["name"]: str(zoo / m["path"]) for m in manifest["models"]}


FULL_EVALUATIONS = {"early_stop": {"mode": "off"}, "racing": {"mode": "off"}}


def evaluation_section(
    evaluation: dict[str, Any] | None, settings: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The study file's ``evaluation`` section: ``evaluation`` (None: full evaluation) with a strategy's
    own ``settings`` added per subsection (not to full evaluation, where nothing is stopped)."""
    if evaluation is None:
        return FULL_EVALUATIONS
    return {**evaluation, **{k: {**evaluation.get(k, {}), **v} for k, v in settings.items()}}


def run_strategy(
    tmp: Path,
    zoo: Path,
    paths: dict[str, str],
    name: str,
    layers: dict[str, Any],
    seed: int = 0,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create and run one campaign (``sampler.seed`` = ``seed``); its final Recipe, evaluations spent (a
    candidate stopped early counts as one), item evaluations and wall time. ``evaluation``: the study
    file's ``evaluation`` section (default: every candidate scored on every item, as the table's rows
    were measured; ``--early-stop auto`` passes {} for the defaults), to which a strategy's own
    ``_evaluation`` settings are added (not to full evaluation: nothing is stopped there)."""
    import optuna

    from olmopt.cli import main
    from olmopt.search.campaign import Campaign
    from olmopt.search.kind import EXTENDED
    from olmopt.search.trials import costs_budget

    layers = dict(layers)
    extra = layers.pop("_decisions", {})  # other decisions: a merge stage before the layers, the base
    spec = {
        "name": name,
        "pool": {"models": list(paths.values())},
        "objectives": zoo_objectives(),
        "selection": layers.pop("_selection", {}),
        "decisions": {"base": {"mode": "fixed", "model": paths["base"]}, "layers": layers, **extra},
        "sampler": {"name": "tpe", "seed": seed, **layers.pop("_sampler", {})},
        "evaluation": evaluation_section(evaluation, layers.pop("_evaluation", {})),
    }
    url = f"sqlite:///{tmp / (name + '.db')}"
    study_file = tmp / f"{name}.yaml"
    study_file.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    for argv in (
        ["study", "create", str(study_file), "--storage", url],
        ["study", "run", name, "--storage", url, "--quiet"],
    ):
        if main(argv) != 0:
            raise SystemExit(f"{name}: olmopt {argv[0]} {argv[1]} failed")
    wall = time.perf_counter() - start
    campaign = Campaign.load(name, url)
    evaluations = trials = held_checks = items = 0
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    for stage in campaign.plan:
        study = campaign.existing_stage_study(stage)
        if study is None:
            continue
        for t in study.get_trials(deepcopy=False, states=done):
            trials += 1
            evaluations += costs_budget(t)
            items += int(t.user_attrs.get("n_items", 0))
    decisions = campaign.decisions()
    held_checks = len({d.recipe.to_json() for d in decisions.values() if d.held_out})
    extended = {key: d.details[EXTENDED] for key, d in decisions.items() if d.details.get(EXTENDED)}
    final = campaign.final_recipe()
    assert final is not None
    return {
        "recipe": final,
        "evaluations": evaluations,
        "trials": trials,
        "items": items,
        "held_out_checks": held_checks,
        "extended": extended,  # stage key -> evaluations an extension added (yield_to_layers)
        "wall_s": wall,
    }


def scorer(zoo: Path, paths: dict[str, str], test_files: dict[str, Path]):  # type: ignore[no-untyped-def]
    """Two evaluation contexts: objectives/zoo.yaml (search + held-out) and the sealed test split."""
    from olmopt.config import StudyConfig
    from olmopt.search.context import EvalContext

    def ctx(objs: list[dict[str, Any]]) -> EvalContext:
        spec = {
            "name": "score",
            "pool": {"models": list(paths.values())},
            "objectives": objs,
            "root": str(REPO),
        }
        spec["decisions"] = {"base": {"mode": "fixed", "model": paths["base"]}, "layers": {"mode": "off"}}
        return EvalContext(StudyConfig.model_validate(spec))

    test_objs = [
        {"name": o["name"], "dataset": str(test_files[o["name"]]), "metric": o["metric"], "held_out": 0.0}
        for o in zoo_objectives()
    ]
    return ctx(zoo_objectives()), ctx(test_objs)


def mean_ci(scores: dict[str, float], counts: dict[str, int]) -> tuple[float, float]:
    """Mean over skills and the half-width of its 95 % interval (the export verdict's rule)."""
    from olmopt.confidence import mean_with_interval

    result = mean_with_interval(scores, dict.fromkeys(scores, "maximize"), counts)
    assert result is not None  # zoo skills are accuracies
    return result[0], result[1]


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean of ``values`` and the half-width of its 95 % Student-t interval (nan for a single value)."""
    from scipy import stats

    k = len(values)
    mean = sum(values) / k
    if k < 2:
        return mean, float("nan")
    return mean, float(stats.t.ppf(0.975, k - 1)) * statistics.stdev(values) / k**0.5


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (family, budget, strategy) over its campaign seeds, in first-seen order: the mean
    of every figure, the 95 % t interval of the test mean across seeds (``seed_ci95``) beside the mean
    single-run interval (``test_ci95``), and whether every seed ended on the same Recipe."""
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["budget"], r["strategy"]), []).append(r)
    summaries = []
    for runs in groups.values():
        mean, across = t_interval([r["test_mean"] for r in runs])

        def avg(key: str, runs: list[dict[str, Any]] = runs) -> float:
            return sum(r[key] for r in runs) / len(runs)

        gaps = [r["gap_closed"] for r in runs]
        first = runs[0]
        summaries.append(
            {
                **{k: first[k] for k in ("family", "budget", "strategy")},
                **{k: first[k] for k in ("best_single_test_mean", "ground_truth_test_mean")},
                "accepted": first.get("accepted", True),
                "donors": first.get("donors", 5),
                "ground_truth_held_out_copeland": first.get("ground_truth_held_out_copeland"),
                "ground_truth_test_copeland": first.get("ground_truth_test_copeland"),
                "test_copeland": avg("test_copeland") if all("test_copeland" in r for r in runs) else None,
                "seeds": [r.get("seed", 0) for r in runs],
                "same_recipe": len({json.dumps(r["recipe"], sort_keys=True) for r in runs}) == 1,
                "test_mean": mean,
                "seed_ci95": across,
                "test_ci95": avg("test_ci95"),
                "test": {s: sum(r["test"][s] for r in runs) / len(runs) for s in first["test"]},
                "gap_closed": None if None in gaps else sum(gaps) / len(gaps),
                **{
                    k: avg(k)
                    for k in (
                        "held_out_copeland",
                        "held_out_copeland_best_donor",
                        "evaluations",
                        "held_out_checks",
                        "wall_s",
                    )
                },  # fmt: skip
            }
        )
    return summaries


def target_flags(s: dict[str, Any]) -> dict[str, bool | None]:
    """Issue 15's targets for one campaign or summary: ``share`` (test mean >= 95 % of the ground-truth
    recipe's), ``above`` (above the best single donor; None where the recipe is not), ``not_below`` (not
    below that donor; None where the recipe is above it), ``copeland`` (held-out Copeland beating every
    donor) and ``copeland_reached`` (the same where the ground-truth recipe beats every donor there too;
    None where it does not, or where its count is unknown: a target no merge is shown to reach)."""
    best, truth, mean = s["best_single_test_mean"], s["ground_truth_test_mean"], s["test_mean"]
    donors = s.get("donors", 5)
    copeland = s["held_out_copeland"] == donors
    return {
        "share": mean >= 0.95 * truth,
        "above": mean > best if truth > best else None,
        "not_below": mean >= best if truth <= best else None,
        "copeland": copeland,
        "copeland_reached": copeland if s.get("ground_truth_held_out_copeland") == donors else None,
    }


def targets(s: dict[str, Any]) -> str:
    """Issue 15's targets for one summary (``target_flags``) in words."""
    best, truth, mean = s["best_single_test_mean"], s["ground_truth_test_mean"], s["test_mean"]
    met = target_flags(s)
    above = (
        ("met" if met["above"] else "missed")
        if met["above"] is not None
        else f"n/a (recipe below the best donor; the merge {mean - best:+.3f} from it)"
    )
    copeland = "met" if met["copeland"] else "missed"
    truth_cope = s.get("ground_truth_held_out_copeland")
    if truth_cope is not None:  # reported only: what the zoo's own recipe scores on the same test
        reach = "met" if truth_cope == s.get("donors", 5) else "missed"
        copeland += f" (the ground-truth recipe: {truth_cope:+.0f}, {reach})"
    if s.get("test_copeland") is not None:  # the same count on the sealed test split (400 items per skill)
        on_test = "met" if s["test_copeland"] == s.get("donors", 5) else "missed"
        copeland += f"; on the sealed test split {_num(s['test_copeland'], '+')}, {on_test}"
        if (truth_test := s.get("ground_truth_test_copeland")) is not None:
            copeland += f" (the ground-truth recipe: {truth_test:+.0f})"
    return (
        f"{s['strategy']}: >= 95 % of the recipe {'met' if met['share'] else 'missed'} "
        f"({mean / truth:.0%}); above the best donor {above}; beats every donor on held-out Copeland "
        f"{copeland}"
    )


def load_results(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(run metadata, rows) of a result file (older files are a bare list of rows)."""
    data = json.loads(Path(path).read_text())
    return ({}, data) if isinstance(data, list) else (data["meta"], data["rows"])


def _num(x: float, sign: str = "") -> str:
    """An integer as one, anything else with one decimal (means over seeds)."""
    return f"{x:{sign}.0f}" if float(x).is_integer() else f"{x:{sign}.1f}"


def run_line(meta: dict[str, Any]) -> str:
    done = "" if meta["complete"] else f", stopped before the end ({meta['campaigns']} campaigns finished)"
    return (
        f"Run: {meta['machine']}; {meta['jobs']} worker process(es), {meta['seeds']} campaign seed(s), "
        f"{meta['campaigns']} campaigns; total wall {meta['wall_s']:.0f} s{done}; load average "
        f"{meta['load_start']:.1f} at start, {meta['load_end']:.1f} at the end."
    )


def render(paths: list[str]) -> str:
    """Markdown tables (one per family and budget) from result files this script wrote."""
    rows: list[dict[str, Any]] = []
    out = []
    for path in paths:
        meta, more = load_results(path)
        rows += more
        if meta:
            out.append(run_line(meta))
    summaries = aggregate(rows)
    for fam, budget in dict.fromkeys((s["family"], s["budget"]) for s in summaries):
        mine = sorted(
            (s for s in summaries if s["family"] == fam and s["budget"] == budget),
            key=lambda s: -s["test_mean"],
        )
        first = mine[0]
        mark = "accepted" if first["accepted"] else "NOT accepted: fails the zoo's acceptance criteria"
        out.append(
            f"\n**{fam}** [{mark}] (budget {budget}): best single donor "
            f"{first['best_single_test_mean']:.3f}, ground-truth recipe "
            f"{first['ground_truth_test_mean']:.3f} (test means)"
            + (
                f"; its held-out Copeland {truth_cope:+.0f}"
                if (truth_cope := first.get("ground_truth_held_out_copeland")) is not None
                else ""
            )
            + "\n"
        )
        skills = list(first["test"])
        out.append(
            "| strategy | seeds | test mean ± 95 % across seeds (t) | ± 95 % one run | "
            + "".join(f"{k} | " for k in skills)
            + "held-out Copeland (best donor) | gap closed | evaluations (+held-out checks) | wall |"
        )
        out.append("|---" * (8 + len(skills)) + "|")
        for s in mine:
            t = s["test"]
            n = len(s["seeds"])
            seeds = f"{n} (same merge)" if n > 1 and s["same_recipe"] else str(n)
            across = "n/a" if math.isnan(s["seed_ci95"]) else f"{s['seed_ci95']:.3f}"
            gap = f"{s['gap_closed']:+.2f}" if s["gap_closed"] is not None else "n/a"
            out.append(
                f"| {s['strategy']} | {seeds} | {s['test_mean']:.3f} ± {across} | {s['test_ci95']:.3f} | "
                + "".join(f"{t[k]:.2f} | " for k in skills)
                + f"{_num(s['held_out_copeland'], '+')} ({_num(s['held_out_copeland_best_donor'], '+')}) | "
                f"{gap} | {_num(s['evaluations'])} (+{_num(s['held_out_checks'])}) | {s['wall_s']:.0f} s |"
            )
        out += [f"\nTargets, {targets(s)}." for s in mine if s["strategy"] in ("default", "main-job")]
    out += overview(rows)
    return "\n".join(out)


def overview(rows: list[dict[str, Any]], reference: str = "main-job") -> list[str]:
    """One markdown table over every family: per strategy its test mean on each (family, budget) (mean
    over seeds), the mean of those, the test-mean difference against ``reference`` paired by campaign
    (family, budget, seed; 95 % Student-t interval), and the campaigns at >= 95 % of the ground-truth
    recipe and not below the best single donor (above it where the recipe is), and those beating every
    donor on held-out Copeland (in brackets: among the campaigns whose ground-truth recipe does). Empty
    without the reference or with fewer than two (family, budget) groups."""
    groups = list(dict.fromkeys((r["family"], r["budget"]) for r in rows))
    by_key = {(r["family"], r["budget"], r["seed"], r["strategy"]): r for r in rows}
    if len(groups) < 2 or not any(k[3] == reference for k in by_key):
        return []
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    head = [f"{fam}{'' if budget == 100 else f' ({budget})'}" for fam, budget in groups]
    out = [
        f"\n**Overview** (test means over seeds; paired against {reference} per campaign)\n",
        "| strategy | " + " | ".join(head) + " | mean | against " + reference + " (95 % t) | targets met "
        "| held-out Copeland against every donor (where the recipe does) |",
        "|---" * (len(groups) + 5) + "|",
    ]
    table: list[tuple[float, str]] = []  # (mean over the groups, the strategy's row)
    for name in names:
        mine = [r for k, r in by_key.items() if k[3] == name]
        cells = []
        for fam, budget in groups:
            vals = [r["test_mean"] for r in mine if (r["family"], r["budget"]) == (fam, budget)]
            cells.append(sum(vals) / len(vals) if vals else math.nan)
        diffs = [
            r["test_mean"] - ref["test_mean"]
            for (fam, budget, seed, strategy), r in by_key.items()
            if strategy == name and (ref := by_key.get((fam, budget, seed, reference))) is not None
        ]
        diff, half = t_interval(diffs) if diffs else (math.nan, math.nan)
        flags = [target_flags(r) for r in mine]
        met = sum(f["share"] and f["above"] is not False and f["not_below"] is not False for f in flags)
        cope = sum(bool(f["copeland"]) for f in flags)
        reachable = [f["copeland_reached"] for f in flags if f["copeland_reached"] is not None]
        reach = f"{sum(reachable)} of {len(reachable)}"
        known = [c for c in cells if not math.isnan(c)]
        mean, n = sum(known) / len(known), len(mine)
        against = "" if name == reference else f"{diff:+.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}")
        row = (
            f"| {name} | "
            + " | ".join("" if math.isnan(c) else f"{c:.3f}" for c in cells)
            + f" | {mean:.3f} | {against} | {met} of {n} | {cope} of {n} ({reach}) |"
        )
        table.append((mean, row))
    return out + [row for _, row in sorted(table, key=lambda t: -t[0])]


def zoo_arg(text: str) -> tuple[Path, list[int] | None]:
    """``DIR`` or ``DIR=B1,B2``: a zoo directory and the budgets for it alone (None: ``--budget``)."""
    head, sep, tail = text.rpartition("=")
    if sep and tail and all(b.isdigit() and int(b) > 0 for b in tail.split(",")):
        return Path(head), [int(b) for b in tail.split(",")]
    return Path(text), None


def one_thread() -> None:
    """Worker initializer: one torch thread per campaign process."""
    os.environ["OLMOPT_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def campaign_job(job: dict[str, Any]) -> dict[str, Any]:
    """One campaign (a worker's unit of work); the final Recipe travels back as JSON."""
    run = run_strategy(
        Path(job["tmp"]), Path(job["zoo"]), job["paths"], job["campaign"], job["layers"], job["seed"],
        job.get("evaluation"),
    )  # fmt: skip
    run["recipe"] = run["recipe"].to_json()
    return run


def execute(jobs: list[dict[str, Any]], workers: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(job, run) for every campaign as it finishes: in this process with one worker, else in ``workers``
    spawned processes (submitted in order, so a stopped run has finished the first jobs)."""
    if workers == 1:
        for job in jobs:
            yield job, campaign_job(job)
        return
    pool = ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread
    )
    try:
        futures = {pool.submit(campaign_job, job): job for job in jobs}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        pool.shutdown(cancel_futures=True)


class Family:
    """One zoo family's scoring: the two evaluation contexts (built on demand, the last two families kept)
    and its reference figures (the single donors and the ground-truth recipe)."""

    contexts: dict[str, tuple[Any, Any]] = {}

    def __init__(self, zoo: Path, test_files: dict[str, Path]) -> None:
        from olmopt.recipe import Recipe

        self.zoo, self.test_files = zoo, test_files
        self.manifest, self.paths = family(zoo)
        self.n_layers = int(self.manifest["model_config"]["num_hidden_layers"])
        self.singles = {name: Recipe(base=path) for name, path in self.paths.items()}
        truth = self.manifest["layer_recipe"]
        self.truth = Recipe(
            base=self.paths[truth["base"]], layers={int(i): self.paths[m] for i, m in truth["layers"].items()}
        )
        self.refs: dict[str, Any] | None = None

    def plans(self, budget: int) -> dict[str, dict[str, Any]]:
        return strategies(budget, self.n_layers, len(self.paths))

    def ctx(self) -> tuple[Any, Any]:
        key = str(self.zoo)
        if key not in Family.contexts:
            while len(Family.contexts) >= 2:
                del Family.contexts[next(iter(Family.contexts))]
            Family.contexts[key] = scorer(self.zoo, self.paths, self.test_files)
        return Family.contexts[key]

    def references(self) -> dict[str, Any]:
        if self.refs is None:
            search_ctx, test_ctx = self.ctx()
            counts = {o.name: len(test_ctx.evaluator.encoded(o, "search")) for o in test_ctx.objectives}
            tests = {n: test_ctx.score(r, "search") for n, r in self.singles.items()}
            truth_test = test_ctx.score(self.truth, "search")
            self.refs = {
                "counts": counts,
                "held_out": {n: search_ctx.score(r, "held_out") for n, r in self.singles.items()},
                "test": tests,
                "best_single": max(mean_ci(t, counts)[0] for t in tests.values()),
                "truth": mean_ci(truth_test, counts)[0],
            }
            truth_cope = self.copeland(search_ctx.score(self.truth, "held_out"))
            self.refs["truth_copeland"] = truth_cope["merged"]
            self.refs["truth_test_copeland"] = self.copeland(truth_test, "test")["merged"]
        return self.refs

    def copeland(self, values: dict[str, float], split: str = "held_out") -> dict[str, float]:
        """Copeland scores of a merge (``values``: its scores on ``split``, "merged") and the singles, on
        the held-out part (50 items per skill) or the sealed test split ("test", 400 per skill)."""
        from olmopt.search.finalize import copeland_verdict

        assert self.refs is not None
        table = [{"model": "merged", "held_out": values}]
        table += [{"model": n, "held_out": self.refs[split][n]} for n in self.singles]
        return dict(copeland_verdict(table, dict.fromkeys(values, "maximize"))["scores"])

    def header(self) -> str:
        key = self.manifest["build_key"]
        refs = self.references()
        mark = "accepted" if self.manifest["acceptance"]["passed"] else "NOT accepted"
        return (
            f"## {self.zoo.name} ({key['arch']}, {key['size']}, seed {key['seed']}, {mark}): best single "
            f"donor test mean {refs['best_single']:.3f}; ground-truth recipe {refs['truth']:.3f}"
        )

    def score(self, job: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
        """The benchmark row of one finished campaign (test split, held-out Copeland, gap closed)."""
        from olmopt.recipe import Recipe

        refs = self.references()
        search_ctx, test_ctx = self.ctx()
        recipe = Recipe.from_json(run.pop("recipe"))
        test = test_ctx.score(recipe, "search")
        held = search_ctx.score(recipe, "held_out")
        searched = search_ctx.score(recipe, "search")
        mean, half = mean_ci(test, refs["counts"])
        cope = self.copeland(held)
        test_cope = self.copeland(test, "test")
        gap = refs["truth"] - refs["best_single"]
        return {
            **{k: job[k] for k in ("strategy", "budget", "seed")}, "family": self.zoo.name,
            **run,
            "accepted": bool(self.manifest["acceptance"]["passed"]),
            "test_mean": mean, "test_ci95": half, "test": test, "held_out": held,
            "search": searched,
            "held_out_copeland": cope["merged"],
            "held_out_copeland_best_donor": max(cope[n] for n in self.singles),
            "donors": len(self.singles),
            "gap_closed": (mean - refs["best_single"]) / gap if gap > 0 else None,
            "best_single_test_mean": refs["best_single"], "ground_truth_test_mean": refs["truth"],
            "ground_truth_held_out_copeland": refs["truth_copeland"],
            "test_copeland": test_cope["merged"],
            "test_copeland_best_donor": max(test_cope[n] for n in self.singles),
            "ground_truth_test_copeland": refs["truth_test_copeland"],
            "recipe": json.loads(recipe.to_json()),
        }  # fmt: skip


def fail(message: str) -> NoReturn:
    print(f"search_quality: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--zoo",
        nargs="*",
        default=None,
        help="zoo directories, each DIR or DIR=B1,B2 (default: every family)",
    )
    parser.add_argument("--budget", type=int, nargs="+", default=[100], help="evaluation budgets")
    parser.add_argument("--seeds", type=int, default=1, help="campaign seeds per strategy (S..S+K-1)")
    parser.add_argument("--first-seed", type=int, default=0, help="S, the first campaign seed (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="campaigns run at once, one process each")
    parser.add_argument("--strategies", default=None, help="comma-separated subset")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--early-stop",
        choices=["off", "auto"],
        default="off",
        help="off: every candidate on every item (the table's figures); auto: the study-file defaults "
        "(early stopping and racing under selection.score: mean)",
    )
    parser.add_argument("--out", default=str(REPO / "storage" / "search-quality.json"))
    parser.add_argument(
        "--render", nargs="+", metavar="JSON", help="print markdown tables of earlier results and exit"
    )
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return
    if min(args.budget) < 1 or args.seeds < 1 or args.jobs < 1 or args.first_seed < 0:
        fail("--budget, --seeds and --jobs must be positive, --first-seed at least 0")
    known = list(strategies(100, 2, 2))
    wanted = args.strategies.split(",") if args.strategies else (QUICK if args.quick else known)
    if unknown := [n for n in wanted if n not in known]:
        fail(f"unknown strategy {unknown[0]!r}; known: {', '.join(known)}")
    default_zoos = ["zoo-tiny", "zoo-small", "zoo-small-llama-s0", "zoo-small-llama-s1", "zoo-small-llama-s2"]
    zoo_args = args.zoo or [str(REPO / "storage" / z) for z in (["zoo-tiny"] if args.quick else default_zoos)]
    zoos = [zoo_arg(z) for z in zoo_args]
    budget = [40] if args.quick and args.budget == [100] else args.budget
    for var in ("OLMOPT_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from bench_candidate import machine

    from olmopt.runtime import configure_threads

    configure_threads()  # scoring in this process: one thread too
    host, start, load_start = machine(), time.perf_counter(), os.getloadavg()[0]
    out = Path(args.out)
    results: list[dict[str, Any]] = []

    def write(complete: bool) -> None:
        meta = {
            "machine": host, "jobs": args.jobs, "seeds": args.seeds, "first_seed": args.first_seed,
            "campaigns": len(results),
            "wall_s": time.perf_counter() - start, "load_start": load_start, "load_end": os.getloadavg()[0],
            "complete": complete, "argv": sys.argv[1:], "early_stop": args.early_stop,
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": results}, indent=1))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        test_files = test_split(tmp / "test-split")
        families = {zoo: Family(zoo, test_files) for zoo, _ in zoos}
        # seed 0 of everything first, in the order of --zoo and of the budgets: a run stopped early has
        # whole tables for its first families
        jobs = [
            {
                "tmp": tmp_name, "zoo": str(zoo), "paths": families[zoo].paths, "strategy": name,
                "seed": seed, "budget": b, "layers": families[zoo].plans(b)[name],
                "campaign": f"{zoo.name}-{name}-b{b}-s{seed}".replace("+", "-"),
                "evaluation": None if args.early_stop == "off" else {},
            }
            for seed in range(args.first_seed, args.first_seed + args.seeds)
            for zoo, budgets in zoos
            for b in budgets or budget
            for name in wanted
        ]  # fmt: skip
        print(f"{host}; {len(jobs)} campaigns, {args.jobs} worker process(es)", flush=True)
        shown: set[Path] = set()
        for job, run in execute(jobs, args.jobs):
            fam = families[Path(job["zoo"])]
            if fam.zoo not in shown:
                shown.add(fam.zoo)
                print(f"\n{fam.header()}", flush=True)
            row = fam.score(job, run)
            results.append(row)
            closed = f"{row['gap_closed']:+.2f}" if row["gap_closed"] is not None else "n/a"
            print(
                f"| {fam.zoo.name} | {job['strategy']} | budget {job['budget']} | seed {job['seed']} | "
                f"{row['test_mean']:.3f} ± {row['test_ci95']:.3f} | "
                + " ".join(f"{row['test'][s]:.2f}" for s in row["test"])
                + f" | {row['held_out_copeland']:+.0f} | {closed} | {row['evaluations']} "
                f"(+{row['held_out_checks']}) | {row['wall_s']:.0f} s |",
                flush=True,
            )
            write(complete=False)
    write(complete=True)
    print(f"\ntotal wall {time.perf_counter() - start:.0f} s for {len(results)} campaigns; wrote {out}")
    print(render([str(out)]))


if __name__ == "__main__":
    main()
