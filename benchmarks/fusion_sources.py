"""Depth fusion: the seed's three alpha sources side by side (MKA baseline, gradient fit, Bayesian
optimisation).

    python benchmarks/fusion_sources.py [--zoo storage/zoo-small] [--steps 2] [--trials 20]

Runs a fusion campaign on the zoo's base model (objectives: multiple-choice accuracy, answer perplexity
on the add data, layers removed) and prints the search and held-out figures of the MKA and gradient
trials (enqueued first) and of the stage's Copeland winner.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, default=REPO / "storage" / "zoo-small")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    from olmopt.cli import main as cli
    from olmopt.recipe import Recipe
    from olmopt.search.campaign import Campaign
    from olmopt.search.context import EvalContext

    tmp = Path(tempfile.mkdtemp())
    name = f"fusion-{int(time.time())}"
    spec = {
        "name": name,
        "pool": {"models": [str(args.zoo / "base")]},
        "objectives": [
            {"name": "mc", "dataset": str(REPO / "objectives/mc_choices.json"), "metric": "mc_accuracy"},
            {"name": "ppl", "dataset": str(REPO / "objectives/add.json"), "metric": "perplexity"},
            {"name": "removed", "metric": "layers_removed"},
        ],
        "decisions": {
            "layers": {"mode": "off"},
            "fusion": {"mode": "joint", "max_steps": args.steps, "n_trials": args.trials},
        },
    }
    path = tmp / "fusion.yaml"
    path.write_text(yaml.safe_dump(spec))
    url = f"sqlite:///{tmp}/s.db"
    start = time.time()
    assert cli(["study", "create", str(path), "--storage", url, "--json"]) == 0
    assert cli(["study", "run", name, "--storage", url, "--quiet"]) == 0
    campaign = Campaign.load(name, url)
    decision = campaign.decision(campaign.plan[-1])
    ctx = EvalContext(campaign.config)
    rows = {}
    for label in ("mka", "gradient", decision.winner):
        cand = decision.candidates[label]
        study = campaign.existing_stage_study(campaign.plan[-1])
        trial = next(t for t in study.get_trials() if t.number == cand.trial)
        recipe = Recipe.from_json(trial.user_attrs["recipe"])
        alphas = [round(s.alpha, 3) for s in recipe.fusion]
        rows[f"{label} {alphas}"] = (cand.metrics, ctx.score(recipe, "held_out"))
    base = (
        ctx.score(Recipe(base=campaign.config.pool.models[0]), "search"),
        ctx.score(Recipe(base=campaign.config.pool.models[0]), "held_out"),
    )
    print(
        f"zoo {args.zoo}; up to {args.steps} fusion steps; {args.trials} trials; {time.time() - start:.0f} s"
    )
    print(
        "| alphas (source [values]) | mc search | mc held-out | ppl search | ppl held-out "
        "| layers removed |\n"
        "|---|---|---|---|---|---|"
    )
    print(
        f"| unfused base | {base[0]['mc']:.3f} | {base[1]['mc']:.3f} | {base[0]['ppl']:.3f} | "
        f"{base[1]['ppl']:.3f} | 0 |"
    )
    for label, (s, h) in rows.items():
        print(
            f"| {label} | {s['mc']:.3f} | {h['mc']:.3f} | {s['ppl']:.3f} | {h['ppl']:.3f} | "
            f"{s['removed']:.0f} |"
        )


if __name__ == "__main__":
    main()
