"""Layer-wise versus global parameter-space (PS) merge search at equal budgets (issue 16).

    python benchmarks/ps_layerwise.py [--zoo storage/zoo-tiny] [--method ties] [--budget 40]
                                      [--seeds 0,1] [--strategies a,b] [--out storage/ps-layerwise.json]

Pool: the zoo's base and its four specialists; objectives: objectives/zoo.yaml (add, rev, fact, mc; the
search sees the first 75 % of each file, capped at ``--samples`` items, and the last 25 % are held out).
For every strategy and seed one campaign runs only the ``merge`` stage with ``n_trials = budget``; its
winner (feasible Pareto set, then Copeland, as every stage) is scored on the held-out items. Reported per
strategy: the winner's held-out mean over the four objectives (mean and spread over seeds), its search
mean, the number of winners that are known-good enqueued points rather than sampled ones, and wall time.

Strategies (``--method`` M): ``global-tpe`` (today's stage: one value per variant, the study's TPE),
``global-cmaes`` (CMA-ES on the Borda count, global values), ``layer-cmaes-g1`` / ``layer-cmaes-g2``
(weights and densities per variant and per layer / pair of layers), ``layer-tpe-g2``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STRATEGIES: dict[str, dict[str, Any]] = {
    "global-tpe": {},
    "global-cmaes": {"sampler": "cmaes"},
    "layer-cmaes-g1": {"sampler": "cmaes", "group_size": 1},
    "layer-cmaes-g2": {"sampler": "cmaes", "group_size": 2},
    "layer-tpe-g2": {"sampler": "tpe", "group_size": 2},
}


def study_file(
    zoo: Path, name: str, method: str, budget: int, seed: int, samples: int, merge: dict[str, Any]
) -> dict[str, Any]:
    objectives = yaml.safe_load((REPO / "objectives" / "zoo.yaml").read_text())["objectives"]
    for o in objectives:
        o["dataset"] = str(REPO / o["dataset"])
        o["samples"] = samples
    models = ["base", "spec_add", "spec_rev", "spec_fact", "spec_mc"]
    return {
        "name": name,
        "pool": {"models": [str(zoo / m) for m in models]},
        "objectives": objectives,
        "decisions": {
            "base": {"mode": "fixed", "model": str(zoo / "base")},
            "layers": {"mode": "off"},
            "merge": {"mode": "joint", "methods": [method], "n_trials": budget, **merge},
        },
        "sampler": {"seed": seed},
    }


def run_one(tmp: Path, data: dict[str, Any]) -> dict[str, Any]:
    from olmopt.cli import main
    from olmopt.config import load_study_file
    from olmopt.recipe import Recipe
    from olmopt.search.api import campaign_status
    from olmopt.search.context import EvalContext

    path = tmp / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp}/{data['name']}.db"
    started = time.perf_counter()
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", data["name"], "--storage", url, "--quiet"]) == 0
    seconds = time.perf_counter() - started
    status = campaign_status(data["name"], url)
    recipe = Recipe.from_dict(status["recipe"])
    ctx = EvalContext(load_study_file(path))
    search, held = ctx.score(recipe, "search"), ctx.score(recipe, "held_out")
    stage = status["stages"][-1]
    return {
        "search": search,
        "held_out": held,
        "search_mean": statistics.fmean(search.values()),
        "held_mean": statistics.fmean(held.values()),
        "winner": stage.get("winner") or stage.get("decision", {}).get("label"),
        "layerwise": bool(recipe.param_merge and recipe.param_merge.layer_params),
        "seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=REPO / "storage" / "zoo-tiny")
    parser.add_argument("--method", default="ties")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--samples", type=int, default=60)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", type=Path, default=REPO / "storage" / "ps-layerwise.json")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.strategies.split(","):
            for seed in seeds:
                data = study_file(
                    args.zoo,
                    f"{name}-s{seed}",
                    args.method,
                    args.budget,
                    seed,
                    args.samples,
                    STRATEGIES[name],
                )
                results.setdefault(name, []).append(run_one(Path(tmp), data))
                r = results[name][-1]
                print(
                    f"{name:<16} seed {seed}: held {r['held_mean']:.4f} search {r['search_mean']:.4f} winner "
                    f"{r['winner']} ({r['seconds']} s)",
                    flush=True,
                )
    print(f"\nmethod {args.method}, budget {args.budget} trials, seeds {seeds}, zoo {args.zoo.name}")
    print(
        "| strategy | held-out mean (seeds) | search mean | winners enqueued | s per run |\n"
        "|---|---|---|---|---|"
    )
    for name, rows in results.items():
        held = [r["held_mean"] for r in rows]
        spread = f" ± {statistics.stdev(held):.4f}" if len(held) > 1 else ""
        enq = sum("@" in str(r["winner"]) for r in rows)
        print(
            f"| {name} | {statistics.fmean(held):.4f}{spread} | "
            f"{statistics.fmean(r['search_mean'] for r in rows):.4f} | {enq} of {len(rows)} | "
            f"{statistics.fmean(r['seconds'] for r in rows):.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
