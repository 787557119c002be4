"""What the layer-donor space can reach: every recipe of a small zoo family scored exhaustively.

    python benchmarks/layer_space_oracle.py --zoo DIR [DIR ...] [--strategies default,...] [--budget 100]
                                            [--out storage/layer-space-oracle.json]

For a family whose layer-donor space is small enough to enumerate (the tiny families: 4 layers x 5 pool
models = 625 recipes), with the base fixed to the pool's base as in the search-quality benchmark's
campaigns, every recipe is scored on the search and held-out parts of objectives/zoo.yaml and on the
benchmark's sealed test split (``search_quality.test_split``, same scorer, same interval and Copeland
rule). It prints the best recipe by test mean, how many recipes beat every single donor on held-out
Copeland (every head-to-head won) and the best held-out Copeland score reachable, the ground-truth
recipe's rank and, with ``--strategies``, where each strategy's final pick ranks (its campaign is run by
``search_quality.run_strategy`` at ``--budget``). This is a ceiling for reporting: no strategy reads it.

Recipes are enumerated with the last layer varying fastest and each group of recipes that share their
lower layers is scored from the prefix cache (the hidden states entering the last layer under the group's
first recipe), which gives the same figures as full forwards (``--check N`` compares N recipes).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import search_quality as sq  # noqa: E402  (the benchmark's test split, scorer, family and rules)

REPO = sq.REPO
MAX_RECIPES = 5000  # beyond this the space is not enumerated (small families: 5^6 = 15,625 recipes)


def assignments(pool: list[str], n_layers: int) -> list[tuple[str, ...]]:
    """Every layer-donor assignment (one pool model per layer), the last layer varying fastest."""
    return list(itertools.product(pool, repeat=n_layers))


def recipe_of(assignment: tuple[str, ...], paths: dict[str, str]) -> Any:
    """The Recipe of one assignment: base fixed to the pool's base, layers taken from other donors."""
    from olmopt.recipe import Recipe

    layers = {i: paths[m] for i, m in enumerate(assignment) if m != "base"}
    return Recipe(base=paths["base"], layers=layers)


def assignment_of(recipe: dict[str, Any], paths: dict[str, str], n_layers: int) -> tuple[str, ...] | None:
    """A recipe JSON (as the benchmark writes it) as an assignment; None when it is outside the space."""
    name = {p: n for n, p in paths.items()}
    if recipe.get("base") != paths["base"] or any(
        recipe.get(k) for k in ("boundary", "units", "param_merge", "es", "fusion", "dfs")
    ):
        return None
    layers = {int(i): name.get(p) for i, p in (recipe.get("layers") or {}).items()}
    if any(v is None for v in layers.values()):
        return None
    return tuple(layers.get(i) or "base" for i in range(n_layers))


def score_space(
    search_ctx: Any, test_ctx: Any, paths: dict[str, str], n_layers: int, progress: bool = True
) -> dict[tuple[str, ...], dict[str, Any]]:
    """assignment -> {"search", "held_out", "test"} figures of every recipe of the space."""
    pool = list(paths)
    last = n_layers - 1
    scores: dict[tuple[str, ...], dict[str, Any]] = {}
    start = time.perf_counter()
    space = assignments(pool, n_layers)
    for g in range(0, len(space), len(pool)):
        group = space[g : g + len(pool)]  # same lower layers, every donor of the last one
        incumbent = recipe_of(group[0], paths)
        for a in group:
            recipe = recipe_of(a, paths)
            scores[a] = {
                "search": search_ctx.score(recipe, "search", incumbent, last),
                "held_out": search_ctx.score(recipe, "held_out"),
                "test": test_ctx.score(recipe, "search", incumbent, last),
            }
        if progress and (g // len(pool)) % 25 == 24:
            print(f"  {len(scores)}/{len(space)} recipes, {time.perf_counter() - start:.0f} s", flush=True)
    return scores


def check_cache(search_ctx: Any, test_ctx: Any, paths: dict[str, str], scores: dict, n: int) -> int:
    """Re-score ``n`` recipes with full forwards; the number whose figures differ from the cached ones."""
    differ = 0
    for a in list(scores)[1 :: max(1, len(scores) // max(n, 1))][:n]:
        recipe = recipe_of(a, paths)
        full = {"search": search_ctx.score(recipe, "search"), "test": test_ctx.score(recipe, "search")}
        differ += full["search"] != scores[a]["search"] or full["test"] != scores[a]["test"]
    return differ


def verdicts(
    scores: dict[tuple[str, ...], dict[str, Any]],
    donors: dict[str, dict[str, Any]],
    counts: dict[str, int],
) -> list[dict[str, Any]]:
    """Rows per recipe, best test mean first: test mean and interval, held-out Copeland against the
    donors (``copeland``: donors beaten head to head; ``sole``: above every donor's Copeland score)."""
    from olmopt.search.finalize import copeland_verdict

    rows = []
    for a, s in scores.items():
        mean, half = sq.mean_ci(s["test"], counts)
        table = [{"model": "merged", "held_out": s["held_out"]}]
        table += [{"model": n, "held_out": d["held_out"]} for n, d in donors.items()]
        verdict = copeland_verdict(table, dict.fromkeys(s["held_out"], "maximize"))
        cope = verdict["scores"]
        rows.append(
            {
                "layers": list(a),
                "test_mean": mean,
                "test_ci95": half,
                "search_mean": sum(s["search"].values()) / len(s["search"]),
                "held_out_mean": sum(s["held_out"].values()) / len(s["held_out"]),
                "copeland": cope["merged"],
                "best_donor_copeland": max(cope[n] for n in donors),
                "sole": bool(verdict["merged_is_sole_winner"]),
                **{k: s[k] for k in ("search", "held_out", "test")},
            }
        )
    rows.sort(key=lambda r: (-r["test_mean"], r["layers"]))
    return rows


def rank_of(rows: list[dict[str, Any]], layers: tuple[str, ...]) -> tuple[int, dict[str, Any]]:
    """1-based rank by test mean (ties share the best rank) and the row of ``layers``."""
    row = next(r for r in rows if tuple(r["layers"]) == layers)
    return 1 + sum(r["test_mean"] > row["test_mean"] for r in rows), row


def describe(row: dict[str, Any]) -> str:
    t = row["test"]
    return (
        f"[{', '.join(row['layers'])}] test {row['test_mean']:.3f} ± {row['test_ci95']:.3f} ("
        + " ".join(f"{k} {v:.2f}" for k, v in t.items())
        + f"), held-out mean {row['held_out_mean']:.3f}, held-out Copeland {row['copeland']:+.0f}"
        f" (best donor {row['best_donor_copeland']:+.0f})"
    )


def summary(
    rows: list[dict[str, Any]], n_donors: int, gt: tuple[str, ...], picks: dict[str, tuple[str, ...] | None]
) -> dict[str, Any]:
    """What the space reaches, as printed: best recipe, Copeland counts, ranks of the truth and picks."""
    beats_all = [r for r in rows if r["copeland"] >= n_donors]
    sole = [r for r in rows if r["sole"]]
    best_cope = max(r["copeland"] for r in rows)
    out: dict[str, Any] = {
        "recipes": len(rows),
        "best_by_test": rows[0],
        "beats_every_donor": len(beats_all),
        "sole_copeland_winner": len(sole),
        "best_copeland": best_cope,
        "best_test_with_best_copeland": next(r for r in rows if r["copeland"] == best_cope),
        "best_test_beating_every_donor": beats_all[0] if beats_all else None,
        "ground_truth_rank": rank_of(rows, gt)[0],
        "picks": {},
    }
    for name, a in picks.items():
        out["picks"][name] = None if a is None else dict(zip(("rank", "row"), rank_of(rows, a), strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", nargs="+", required=True, help="zoo directories (tiny families)")
    parser.add_argument("--strategies", default="", help="rank these strategies' picks (their campaigns run)")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--check", type=int, default=0, help="re-score N recipes without the prefix cache")
    parser.add_argument("--out", default=str(REPO / "storage" / "layer-space-oracle.json"))
    args = parser.parse_args()
    os.environ.setdefault("OLMOPT_THREADS", "1")
    from olmopt.recipe import Recipe

    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        test_files = sq.test_split(tmp / "test-split")
        for zoo in map(Path, args.zoo):
            manifest, paths = sq.family(zoo)
            n_layers = int(manifest["model_config"]["num_hidden_layers"])
            if len(paths) ** n_layers > MAX_RECIPES:
                print(f"{zoo}: {len(paths)}^{n_layers} recipes, not enumerated", file=sys.stderr)
                sys.exit(2)
            search_ctx, test_ctx = sq.scorer(zoo, paths, test_files)
            counts = {o.name: len(test_ctx.evaluator.encoded(o, "search")) for o in test_ctx.objectives}
            donors = {
                n: {"held_out": search_ctx.score(Recipe(base=p), "held_out"),
                    "test": test_ctx.score(Recipe(base=p), "search")}
                for n, p in paths.items()
            }  # fmt: skip
            donor_means = {n: sq.mean_ci(d["test"], counts) for n, d in donors.items()}
            truth = manifest["layer_recipe"]
            gt = tuple(truth["layers"].get(str(i), truth["base"]) for i in range(n_layers))
            print(f"\n## {zoo.name}: {len(paths)}^{n_layers} = {len(paths) ** n_layers} recipes", flush=True)
            start = time.perf_counter()
            scores = score_space(search_ctx, test_ctx, paths, n_layers)
            wall = time.perf_counter() - start
            differ = check_cache(search_ctx, test_ctx, paths, scores, args.check) if args.check else None
            rows = verdicts(scores, donors, counts)
            picks: dict[str, tuple[str, ...] | None] = {}
            runs = {}
            plans = sq.strategies(args.budget, n_layers, len(paths))
            for name in filter(None, args.strategies.split(",")):
                run = sq.run_strategy(tmp, zoo, paths, f"{zoo.name}-{name}".replace("+", "-"), plans[name])
                picks[name] = assignment_of(json.loads(run.pop("recipe").to_json()), paths, n_layers)
                runs[name] = run  # evaluations, held-out checks, wall
            result = summary(rows, len(paths), gt, picks)
            for name, pick in result["picks"].items():
                if pick is not None:
                    pick["run"] = runs[name]
            best_donor = max(donor_means, key=lambda n: donor_means[n][0])
            result |= {"family": zoo.name, "wall_s": wall, "cache_mismatches": differ, "rows": rows}
            result["donor_test_means"] = {n: m[0] for n, m in donor_means.items()}
            results.append(result)
            bd = donor_means[best_donor]
            print(f"scored in {wall:.0f} s" + (f"; {differ} of {args.check} differ from full forwards"
                                               if differ is not None else ""))  # fmt: skip
            print(f"best single donor: {best_donor} test {bd[0]:.3f} ± {bd[1]:.3f}")
            print(f"best recipe by test mean: {describe(result['best_by_test'])}")
            print(
                f"beat every donor on held-out Copeland (+{len(paths)}): {result['beats_every_donor']} "
                f"recipes; above every donor's Copeland score: {result['sole_copeland_winner']}; best "
                f"held-out Copeland reachable {result['best_copeland']:+.0f}"
            )
            print(f"best test mean at that Copeland: {describe(result['best_test_with_best_copeland'])}")
            gt_row = rank_of(rows, gt)[1]
            print(f"ground-truth recipe: rank {result['ground_truth_rank']}: {describe(gt_row)}")
            for name, pick in result["picks"].items():
                if pick is None:
                    print(f"{name}: its pick is outside the layer space")
                else:
                    run = pick["run"]
                    print(
                        f"{name}: rank {pick['rank']} of {len(rows)}: {describe(pick['row'])}; "
                        f"{run['evaluations']} evaluations (+{run['held_out_checks']}), {run['wall_s']:.0f} s"
                    )
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
