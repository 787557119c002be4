"""ES generations per minute on one unit with every dataset, and the share of time outside evaluation.

Model: storage/zoo-small if built, else storage/zoo-tiny, else a random family (printed as "model").
Runs SVD-ES and norm-ES generations as campaign stages (the real runner, SQLite storage in a temp dir,
one worker) and splits the wall time into: evaluation (the evaluator's forward passes), patching
(Recipe -> tensors, i.e. ES replay from seeds incl. the SVD, plus undo), ES planning (parent tensor, SVD
basis, sigma, the offspring check in decode) and the rest (Optuna storage, selection, bookkeeping).

    OLMOPT_THREADS=1 .venv/bin/python benchmarks/bench_es.py [--generations 2] [--unit NAME] [--json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def pick_pool(tmp: Path) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(label, pool models, objectives) for the largest zoo available, else a random family."""
    for name in ("zoo-small", "zoo-tiny"):
        zoo = ROOT / "storage" / name
        if (zoo / "base" / "model.safetensors").exists() or (
            zoo / "base" / "model.safetensors.index.json"
        ).exists():
            objectives = [
                {"name": n, "dataset": f"objectives/{f}", "metric": m, "held_out": 0.25}
                for n, f, m in (
                    ("add", "add.json", "token_accuracy"),
                    ("rev", "rev.json", "token_accuracy"),
                    ("fact", "fact.json", "token_accuracy"),
                    ("mc", "mc_choices.json", "mc_accuracy"),
                )
            ]
            return f"storage/{name}/base", [f"storage/{name}/base"], objectives
    sys.path.insert(0, str(ROOT / "tests"))
    from _models import make_family

    family = make_family(tmp, ["a"], layers=4)
    data = [
        {"conversation": [{"from": "human", "value": f"{i}+{i}="}, {"from": "gpt", "value": str(2 * i)}]}
        for i in range(64)
    ]
    (tmp / "add.json").write_text(json.dumps(data))
    objectives = [
        {"name": "acc", "dataset": str(tmp / "add.json"), "metric": "token_accuracy", "held_out": 0.25},
        {"name": "ppl", "dataset": str(tmp / "add.json"), "metric": "perplexity", "held_out": 0.25},
    ]
    return "random family (tests/_models.py, 4 layers, hidden 64)", [str(family["a"])], objectives


class Clock:
    """Accumulates wall time of wrapped callables by category."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, owner: Any, attr: str, category: str) -> None:
        fn: Callable[..., Any] = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[category] = self.spent.get(category, 0.0) + time.perf_counter() - start

        setattr(owner, attr, timed)


def run(kind: str, generations: int, unit: str | None, tmp: Path, profile: bool = False) -> dict[str, Any]:
    from olmopt.config import StudyConfig
    from olmopt.evaluate.engine import Evaluator
    from olmopt.patch import WorkingModel
    from olmopt.search.api import preflight
    from olmopt.search.campaign import Campaign
    from olmopt.search.context import EvalContext
    from olmopt.search.kinds import es as es_space
    from olmopt.search.runner import CampaignRunner
    from olmopt.search.workers import Evaluators

    label, models, objectives = pick_pool(tmp)
    probe = StudyConfig.model_validate(
        {"name": "probe", "root": str(ROOT), "pool": {"models": models}, "objectives": objectives}
    )
    ctx = EvalContext(probe)
    unit = unit or "model.layers.1.mlp.down_proj"
    shape = tuple(ctx.working.params[unit + ".weight"].shape)
    es = {kind: {"generations": generations, "units": [unit]}}
    config = StudyConfig.model_validate(
        {
            **probe.model_dump(mode="json"),
            "name": f"bench-{kind}",
            "decisions": {"layers": {"mode": "off"}, "es": es},
        }
    )
    plan, extra = preflight(config)
    campaign = Campaign.create(config, f"sqlite:///{tmp}/{kind}.db", plan, extra)
    clock = Clock()
    clock.wrap(Evaluator, "evaluate", "evaluation")
    clock.wrap(WorkingModel, "apply", "patching")
    clock.wrap(WorkingModel, "undo", "patching")
    clock.wrap(es_space, "plan_generation", "es_planning")
    clock.wrap(es_space.Generation, "offspring", "es_planning")
    runner = CampaignRunner(campaign, Evaluators(config, 1, ctx), progress=False)
    runner.run_stage(campaign.plan[0], {})  # the base stage: not timed
    decisions = campaign.decisions()
    clock.spent.clear()
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    trials = 0
    if profiler:
        profiler.enable()
    for stage in campaign.plan[1:]:
        before = runner.trials_run
        decisions[stage.key] = runner.run_stage(stage, decisions)
        trials += runner.trials_run - before
    wall = time.perf_counter() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    evaluation = clock.spent.get("evaluation", 0.0)
    patch = clock.spent.get("patching", 0.0)
    planning = clock.spent.get("es_planning", 0.0)
    accepted = sum(1 for s in campaign.plan[1:] if decisions[s.key].winner != "parent")
    return {
        "model": label,
        "kind": kind,
        "unit": unit,
        "shape": shape,
        "objectives": [o["name"] for o in objectives],
        "generations": generations,
        "accepted": accepted,
        "trials": trials,
        "wall_s": round(wall, 2),
        "generations_per_min": round(60 * generations / wall, 2),
        "s_per_trial": round(wall / max(trials, 1), 3),
        "evaluation_s": round(evaluation, 2),
        "patching_s": round(patch, 2),
        "es_planning_s": round(planning, 2),
        "other_s": round(wall - evaluation - patch - planning, 2),
        "outside_evaluation_share": round(1 - evaluation / wall, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--unit", default=None, help="default: model.layers.1.mlp.down_proj")
    parser.add_argument("--kinds", default="svd,norm")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--profile", action="store_true", help="cProfile of the timed stages, to stderr")
    args = parser.parse_args()
    from olmopt.runtime import configure_threads

    configure_threads()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            results.append(run(kind, args.generations, args.unit, Path(tmp), args.profile))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"model: {results[0]['model']}; unit {results[0]['unit']} {results[0]['shape']}; objectives "
        f"{results[0]['objectives']}"
    )
    for r in results:
        print(
            f"{r['kind']:>4}-ES: {r['generations']} generations ({r['accepted']} accepted), {r['trials']} "
            f"trials in {r['wall_s']} s -> {r['generations_per_min']} generations/min, {r['s_per_trial']} "
            f"s/trial; evaluation {r['evaluation_s']} s, patching {r['patching_s']} s, ES planning "
            f"{r['es_planning_s']} s, other {r['other_s']} s; outside evaluation "
            f"{100 * r['outside_evaluation_share']:.1f} %"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
