"""Is merging meaningful on the zoo? Held-out Copeland tables for every merge kind olmopt searches.

    python benchmarks/merge_quality.py [--zoo storage/zoo-small] [--trials 40] [--out storage/merge-quality]
        [--quick]

For one zoo it scores, on the search and the held-out parts of objectives/zoo.yaml:
  - every single model of the pool;
  - task arithmetic over all specialists at lambda = 1/n (fixed point);
  - the zoo's ground-truth layer recipe (lower layers from the lower specialist, upper from the upper);
  - a searched parameter-space merge (Circuit-Merge / DELLA / task arithmetic, a joint Optuna stage);
  - a searched greedy layer recipe (OLM traversal);
and reports, per candidate merge, the Copeland score over held-out skills against all single models
(the merge "wins" when its Copeland score is strictly the highest). Also the depth-fusion comparison of
the three alpha sources (MKA baseline, gradient fit, Bayesian optimisation) and a searched data-flow
path against the naive stack. Prints markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def objectives() -> list[dict]:
    return yaml.safe_load((REPO / "objectives" / "zoo.yaml").read_text())["objectives"]


def study(name: str, zoo: Path, decisions: dict, objs: list[dict] | None = None) -> dict:
    objs = objs or [dict(o, dataset=str(REPO / o["dataset"])) for o in objectives()]
    models = [str(zoo / m["name"]) for m in json.loads((zoo / "zoo.json").read_text())["models"]]
    return {
        "name": name,
        "pool": {"models": models},
        "objectives": objs,
        "decisions": {
            "base": {"mode": "fixed", "model": str(zoo / "base")},
            "layers": {"mode": "off"},
            **decisions,
        },
    }


def run_campaign(tmp: Path, spec: dict, url: str) -> dict:
    from olmopt.cli import main
    from olmopt.search.api import campaign_status

    path = tmp / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["study", "create", str(path), "--storage", url]) == 0
    assert main(["study", "run", spec["name"], "--storage", url, "--quiet"]) == 0
    return campaign_status(spec["name"], url)


def copeland_table(rows: dict[str, dict[str, float]], directions: dict[str, str]) -> dict[str, float]:
    from olmopt.select import copeland, rank_table

    scores = {o: {m: v[o] for m, v in rows.items()} for o in directions}
    return copeland(rank_table(scores, directions))


def fixed_merges(zoo: Path, manifest: dict) -> tuple[dict, dict]:
    """(single-model recipes, fixed merges): task arithmetic at 1/n and the ground-truth layer recipe."""
    from olmopt.recipe import ParamMerge, Recipe

    names = [m["name"] for m in manifest["models"]]
    path_of = {n: str(zoo / n) for n in names}
    specialists = [path_of[n] for n in names if n != "base"]
    singles = {n: Recipe(base=path_of[n]) for n in names}
    task_arithmetic = ParamMerge(
        method="task_arithmetic", models=tuple(specialists), params={"lambda": 1 / len(specialists)}
    )
    layers = {}
    for m in manifest["models"]:
        if isinstance(m.get("trained_layers"), list):
            layers.update({i: path_of[m["name"]] for i in m["trained_layers"]})
    merges = {
        "task arithmetic 1/n": Recipe(base=path_of["base"], param_merge=task_arithmetic),
        "ground-truth layer recipe": Recipe(base=path_of["base"], layers=layers),
    }
    return singles, merges


def score_and_print(
    ctx, zoo: Path, manifest: dict, candidates: dict, merges: dict, note: str
) -> tuple[dict, dict]:
    """Score every recipe on both splits, print the markdown
    tables; return (rows, held-out Copeland per merge)."""
    names = [m["name"] for m in manifest["models"]]
    directions = {o.name: o.direction for o in ctx.objectives}
    rows = {}
    for label, recipe in {**candidates, **merges}.items():
        rows[label] = {"search": ctx.score(recipe, "search"), "held_out": ctx.score(recipe, "held_out")}
    objs = list(directions)
    print(f"zoo: {zoo} ({manifest['size']}, {manifest['arch']}); {note}")
    print("\n| model | " + " | ".join(f"{o} search | {o} held-out" for o in objs) + " |")
    print("|---|" + "---|" * (2 * len(objs)))
    for label, r in rows.items():
        print(
            f"| {label} | "
            + " | ".join(f"{r['search'][o]:.3f} | {r['held_out'][o]:.3f}" for o in objs)
            + " |"
        )
    print(
        "\n| merge | held-out Copeland vs the single models | best single | sole winner |\n|---|---|---|---|"
    )
    result = {}
    for label in merges:
        table = {n: rows[n]["held_out"] for n in names} | {label: rows[label]["held_out"]}
        cope = copeland_table(table, directions)
        best_single = max(cope[n] for n in names)
        result[label] = (cope[label], best_single)
        print(
            f"| {label} | {cope[label]:g} | {best_single:g} | "
            f"{'yes' if cope[label] > best_single else 'no'} |"
        )
    return rows, result


def context(zoo: Path):  # type: ignore[no-untyped-def]
    from olmopt.config import StudyConfig
    from olmopt.search.context import EvalContext

    return EvalContext(StudyConfig.model_validate(dict(study("score", zoo, {}), root=str(REPO))))


def quick(zoo: Path) -> tuple[dict, dict]:
    """Only the singles, task arithmetic at 1/n and the ground-truth layer recipe (no searches; seconds)."""
    manifest = json.loads((zoo / "zoo.json").read_text())
    singles, merges = fixed_merges(zoo, manifest)
    return score_and_print(context(zoo), zoo, manifest, singles, merges, "fixed merges only (--quick)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, default=REPO / "storage" / "zoo-small")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "storage" / "merge-quality")
    parser.add_argument("--quick", action="store_true", help="only the singles, TA 1/n and the layer recipe")
    args = parser.parse_args()
    os.environ.setdefault("OLMOPT_THREADS", "1")
    if args.quick:
        quick(args.zoo)
        return
    from olmopt.recipe import Recipe

    args.out.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{args.out}/bench-{int(time.time())}.db"
    manifest = json.loads((args.zoo / "zoo.json").read_text())
    ctx = context(args.zoo)
    candidates, merges = fixed_merges(args.zoo, manifest)
    t0 = time.time()
    searched = run_campaign(
        args.out,
        study(f"merge-{int(t0)}", args.zoo, {"merge": {"mode": "joint", "n_trials": args.trials}}),
        url,
    )
    merges["searched merge (circuit/della/TA)"] = Recipe.from_dict(searched["recipe"])
    greedy = run_campaign(args.out, study(f"layers-{int(t0)}", args.zoo, {"layers": {"mode": "greedy"}}), url)
    merges["searched greedy layers (OLM)"] = Recipe.from_dict(greedy["recipe"])
    score_and_print(
        ctx,
        args.zoo,
        manifest,
        candidates,
        merges,
        f"merge search {args.trials} trials; {time.time() - t0:.0f} s",
    )


if __name__ == "__main__":
    main()
