"""Search quality: which campaign strategy finds the best layer-donor merge, at equal evaluation budgets.

    python benchmarks/search_quality.py [--zoo DIR ...] [--budget 100] [--strategies a,b] [--quick]
                                        [--out storage/search-quality.json]

For every zoo family (a directory built by ``olmopt zoo build``; missing ones are built with the pinned
seed named by the directory ``storage/zoo-SIZE-ARCH[-sSEED]``) and every strategy, it runs a campaign
on SQLite (base fixed to the pool's base, objectives/zoo.yaml), counts the evaluations it spent
(trials whose metrics were not reused, and held-out checks separately) and scores the final Recipe on:

- the search and held-out parts of objectives/zoo.yaml (the campaign saw the first, checked the second);
- a **sealed test split** written by this script (``test_split``): 400 items per skill for add, rev and
  mc, drawn with their own seed and disjoint from every objective item; the 200-entry fact table for
  fact. Search and selection never read it. rev and mc items are new prompts (a few may occur in the
  specialists' training pools, < 1 %); add has only 8,100 prompts and the zoo trains on every one outside
  objectives/, so its test items are trained prompts, like fact's (both measure retained skill).

Per family and strategy it reports the test mean with a 95 % confidence interval (normal approximation
over the items of all skills), the per-skill test scores, held-out Copeland against the donors, the
share of the gap closed between the best single donor and the zoo's ground-truth layer recipe on the
test mean, evaluations and wall time. The ground truth (zoo.json ``layer_recipe``) only scores results:
no strategy reads it. ``--quick``: the tiny llama family, budget 40, four strategies (about 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TEST_SEED = 20261205
TEST_ITEMS = 400


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
            "then_joint": max(10, budget - pairs - sweep),
            "sampler": "tpe",
        },
        # the same with the overfitting guard: the best held-out mean among the joint stage's top 5
        "blocks+joint+guard": {
            "mode": "greedy",
            "windows": [2, 1],
            "then_joint": max(10, budget - pairs - sweep),
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


def default_at(budget: int, n_layers: int, n_pool: int) -> dict[str, Any]:
    """The main job's layer decision with ``budget`` evaluations in all (joint stage plus polish sweeps)."""
    layers = main_job_layers()
    polish = int(layers.get("polish", 0)) * n_layers * (n_pool - 1)
    return {**layers, "n_trials": max(10, budget - polish)}


def ps_then_layers(
    budget: int, n_layers: int, n_pool: int, merge_trials: int, group_size: int | None = None
) -> dict[str, Any]:
    """A merge stage of ``merge_trials`` evaluations, then the main job's layer decision with the rest of
    ``budget`` (its polish sweeps also offer the merge, one donor more per slot)."""
    layers = main_job_layers()
    rest = budget - merge_trials
    polish = int(layers.get("polish", 0)) * n_layers * n_pool
    merge: dict[str, Any] = {
        "mode": "joint",
        "methods": ["ties", "task_arithmetic", "della"],
        "n_trials": merge_trials,
        "group_size": group_size,
    }
    return {**layers, "n_trials": max(10, rest - polish), "_decisions": {"merge": merge}}


def main_job_layers() -> dict[str, Any]:
    """The layer decision and selection rules of the main job, read from studies/zoo.yaml (`make demo`)."""
    study = yaml.safe_load((REPO / "studies" / "zoo.yaml").read_text())
    return {**study["decisions"]["layers"], "_selection": dict(study.get("selection") or {})}


QUICK = ["greedy-forward", "block-swaps", "joint-tpe", "default"]


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


def run_strategy(
    tmp: Path, zoo: Path, paths: dict[str, str], name: str, layers: dict[str, Any]
) -> dict[str, Any]:
    """Create and run one campaign; its final Recipe, evaluations spent and wall time."""
    import optuna

    from olmopt.cli import main
    from olmopt.search.campaign import Campaign

    layers = dict(layers)
    extra = layers.pop("_decisions", {})  # decisions besides the layers (a merge stage before them)
    spec = {
        "name": name,
        "pool": {"models": list(paths.values())},
        "objectives": zoo_objectives(),
        "selection": layers.pop("_selection", {}),
        "decisions": {"base": {"mode": "fixed", "model": paths["base"]}, "layers": layers, **extra},
        "sampler": {"name": "tpe", "seed": 0},
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
    evaluations = trials = held_checks = 0
    for stage in campaign.plan:
        study = campaign.existing_stage_study(stage)
        if study is None:
            continue
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            trials += 1
            evaluations += "reused" not in t.user_attrs
    decisions = campaign.decisions()
    held_checks = len({d.recipe.to_json() for d in decisions.values() if d.held_out})
    final = campaign.final_recipe()
    assert final is not None
    return {
        "recipe": final,
        "evaluations": evaluations,
        "trials": trials,
        "held_out_checks": held_checks,
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
    from olmopt.search.finalize import mean_with_interval

    result = mean_with_interval(scores, dict.fromkeys(scores, "maximize"), counts)
    assert result is not None  # zoo skills are accuracies
    return result[0], result[1]


def render(paths: list[str]) -> str:
    """Markdown tables (one per family) from result files this script wrote."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += json.loads(Path(path).read_text())
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        mine = sorted((r for r in rows if r["family"] == fam), key=lambda r: -r["test_mean"])
        first = mine[0]
        accepted = "" if first.get("accepted", True) else ", fails the zoo's acceptance criteria"
        out.append(
            f"\n**{fam}** (budget {first['budget']}{accepted}): best single donor "
            f"{first['best_single_test_mean']:.3f}, ground-truth recipe "
            f"{first['ground_truth_test_mean']:.3f} (test means)\n"
        )
        out.append(
            "| strategy | test mean ± 95 % | add | rev | fact | mc | held-out Copeland (best donor) | gap "
            "closed | evaluations (+held-out checks) | wall |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in mine:
            t = r["test"]
            gap = f"{r['gap_closed']:+.2f}" if r["gap_closed"] is not None else "n/a"
            out.append(
                f"| {r['strategy']} | {r['test_mean']:.3f} ± {r['test_ci95']:.3f} | {t['add']:.2f} | "
                f"{t['rev']:.2f} | {t['fact']:.2f} | {t['mc']:.2f} | {r['held_out_copeland']:+.0f} "
                f"({r['held_out_copeland_best_donor']:+.0f}) | {gap} | {r['evaluations']} "
                f"(+{r['held_out_checks']}) | {r['wall_s']:.0f} s |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", nargs="*", default=None, help="zoo directories (default: every family)")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--strategies", default=None, help="comma-separated subset")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(REPO / "storage" / "search-quality.json"))
    parser.add_argument(
        "--render", nargs="+", metavar="JSON", help="print markdown tables of earlier results and exit"
    )
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return
    os.environ.setdefault("OLMOPT_THREADS", "1")
    from olmopt.recipe import Recipe
    from olmopt.search.finalize import copeland_verdict

    default_zoos = ["zoo-tiny", "zoo-small", "zoo-small-llama-s0", "zoo-small-llama-s1", "zoo-small-llama-s2"]
    zoos = [
        Path(z)
        for z in (
            args.zoo or [str(REPO / "storage" / z) for z in (["zoo-tiny"] if args.quick else default_zoos)]
        )
    ]
    budget = 40 if args.quick and args.budget == 100 else args.budget
    wanted = args.strategies.split(",") if args.strategies else (QUICK if args.quick else None)
    results: list[dict[str, Any]] = []
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        test_files = test_split(tmp / "test-split")
        for zoo in zoos:
            manifest, paths = family(zoo)
            n_layers = int(manifest["model_config"]["num_hidden_layers"])
            plans = strategies(budget, n_layers, len(paths))
            search_ctx, test_ctx = scorer(zoo, paths, test_files)
            counts = {o.name: len(test_ctx.evaluator.encoded(o, "search")) for o in test_ctx.objectives}
            truth = manifest["layer_recipe"]
            singles = {name: Recipe(base=path) for name, path in paths.items()}
            gt = Recipe(
                base=paths[truth["base"]], layers={int(i): paths[m] for i, m in truth["layers"].items()}
            )
            reference = {**singles, "ground truth": gt}
            ref_scores = {
                n: {s: test_ctx.score(r, "search") for s in ("test",)}
                | {"held_out": search_ctx.score(r, "held_out")}
                for n, r in reference.items()
            }
            best_single = max(mean_ci(ref_scores[n]["test"], counts)[0] for n in singles)
            gt_mean = mean_ci(ref_scores["ground truth"]["test"], counts)[0]
            print(
                f"\n## {zoo.name} ({manifest['build_key']['arch']}, {manifest['build_key']['size']}, seed "
                f"{manifest['build_key']['seed']}), budget {budget}"
            )
            print(f"best single donor test mean {best_single:.3f}; ground-truth recipe {gt_mean:.3f}")
            for name in wanted or list(plans):
                if name not in plans:
                    raise SystemExit(f"unknown strategy {name!r}; known: {', '.join(plans)}")
                layers = plans[name]
                run = run_strategy(tmp, zoo, paths, f"{zoo.name}-{name}".replace("+", "-"), layers)
                recipe = run.pop("recipe")
                test = test_ctx.score(recipe, "search")
                held = search_ctx.score(recipe, "held_out")
                mean, half = mean_ci(test, counts)
                table = [{"model": "merged", "held_out": held}]
                table += [{"model": n, "held_out": ref_scores[n]["held_out"]} for n in singles]
                cope = copeland_verdict(table, dict.fromkeys(held, "maximize"))["scores"]
                gap = gt_mean - best_single
                row = {
                    "family": zoo.name, "strategy": name, "budget": budget, **run,
                    "accepted": bool(manifest["acceptance"]["passed"]),
                    "test_mean": mean, "test_ci95": half, "test": test, "held_out": held,
                    "held_out_copeland": cope["merged"],
                    "held_out_copeland_best_donor": max(cope[n] for n in singles),
                    "gap_closed": (mean - best_single) / gap if gap > 0 else None,
                    "best_single_test_mean": best_single, "ground_truth_test_mean": gt_mean,
                    "recipe": json.loads(recipe.to_json()),
                }  # fmt: skip
                results.append(row)
                closed = f"{row['gap_closed']:+.2f}" if row["gap_closed"] is not None else "n/a"
                print(
                    f"| {name} | {mean:.3f} ± {half:.3f} | "
                    + " ".join(f"{test[s]:.2f}" for s in test)
                    + f" | {cope['merged']:+.0f} | {closed} | {run['evaluations']} "
                    f"(+{run['held_out_checks']}) | {run['wall_s']:.0f} s |",
                    flush=True,
                )
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
