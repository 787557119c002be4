"""Evaluation cache: a finished campaign re-run under a new name, evaluations and wall time.

    python benchmarks/bench_eval_cache.py [--zoo storage/zoo-tiny] [--merge-trials 10]

Runs one campaign on the zoo (base fixed, greedy layers, a joint linear merge; the zoo's four objectives,
60 items each, held-out 0.25) in a fresh SQLite storage, then the same study file under another name in
the same storage. Counts every ``EvalContext.score`` call (each is one evaluation of one candidate on one
split) and prints a markdown table. Target (issue 17): the re-run costs <= 5 % of the first run's
evaluations.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from olmopt.cli import main as cli
from olmopt.search.context import EvalContext

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = {
    "add": "token_accuracy",
    "rev": "token_accuracy",
    "fact": "token_accuracy",
    "mc_choices": "mc_accuracy",
}

calls = {"search": 0, "held_out": 0}
_score = EvalContext.score


def _counted(
    ctx: EvalContext, recipe: Any, split: str = "search", *args: Any, **kwargs: Any
) -> dict[str, float]:
    calls[split] = calls.get(split, 0) + 1
    return _score(ctx, recipe, split, *args, **kwargs)


def study(zoo: Path, tmp: Path, name: str, merge_trials: int) -> Path:
    models = sorted(p.name for p in zoo.iterdir() if p.is_dir())
    data = {
        "name": name,
        "pool": {"models": [str(zoo / m) for m in models]},
        "objectives": [
            {"name": n, "dataset": str(REPO / f"objectives/{n}.json"), "metric": m, "samples": 60}
            for n, m in OBJECTIVES.items()
        ],
        "decisions": {
            "base": {"mode": "fixed", "model": str(zoo / "base")},
            "layers": {"mode": "greedy"},
            "merge": {"mode": "joint", "methods": ["linear"], "n_trials": merge_trials},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(path: Path, name: str, url: str) -> tuple[int, int, float]:
    calls.update(search=0, held_out=0)
    start = time.perf_counter()
    assert cli(["study", "create", str(path), "--storage", url]) == 0
    assert cli(["study", "run", name, "--storage", url, "--quiet"]) == 0
    return calls["search"], calls["held_out"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, default=REPO / "storage/zoo-tiny")
    parser.add_argument("--merge-trials", type=int, default=10)
    args = parser.parse_args()
    EvalContext.score = _counted  # type: ignore[method-assign]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"OLMOPT_THREADS={os.environ.get('OLMOPT_THREADS', '1')}; zoo {args.zoo}")  # fmt: skip
    print("| run | search evaluations | held-out evaluations | total | share of the first run | wall s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        first_total = 0
        for name in ("first", "again"):
            search, held, wall = run(study(args.zoo, Path(tmp), name, args.merge_trials), name, url)
            total = search + held
            first_total = first_total or total
            print(
                f"| {name} | {search} | {held} | {total} | {100 * total / first_total:.1f} % | {wall:.1f} |"
            )


if __name__ == "__main__":
    main()
