"""Trial throughput of a greedy campaign with 1 and 2 workers (evaluation-bound, one thread each).

    python benchmarks/bench_workers.py [--zoo storage/zoo-small] [--postgres URL]
        [--tensor-layers 0,1,2,3,4,5]

Local workers (`study run --workers K`, SQLite) and, with a PostgreSQL URL, K separate `study run`
processes sharing the storage. Throughput is trials/minute over the campaign (first trial's start to
the last one's end); the wall time with every process's start-up (imports, model load) is shown too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS = ["base", "spec_add", "spec_rev", "spec_mc", "spec_fact"]


def study_file(tmp: Path, zoo: Path, name: str, tensor_layers: list[int]) -> Path:
    data = {
        "name": name,
        "pool": {"models": [str(zoo / m) for m in MODELS]},
        "objectives": [
            {"name": s, "dataset": str(REPO / f"objectives/{s}.json"), "metric": "token_accuracy"}
            for s in ("add", "rev", "fact")
        ]
        + [{"name": "mc", "dataset": str(REPO / "objectives/mc_choices.json"), "metric": "mc_accuracy"}],
        "decisions": {
            "base": {"mode": "auto"},
            "layers": {"mode": "greedy"},
            "tensors": {"mode": "greedy", "only": tensor_layers},
        },
        "selection": {"held_out_check": False},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def olmopt(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OLMOPT_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "olmopt.cli", *args], env=env, stdout=subprocess.DEVNULL)


def run(
    url: str, zoo: Path, tmp: Path, workers: int, processes: bool, tensor_layers: list[int]
) -> tuple[float, float, int, int]:
    """(wall seconds incl. start-up, seconds from the first trial's start to the last one's end,
    COMPLETE trials, trials evaluated: not reusing an earlier decision's metrics)."""
    name = f"bench-{uuid.uuid4().hex[:6]}"
    assert (
        olmopt("study", "create", str(study_file(tmp, zoo, name, tensor_layers)), "--storage", url).wait()
        == 0
    )
    start = time.perf_counter()
    if processes:
        procs = [olmopt("study", "run", name, "--storage", url, "--quiet") for _ in range(workers)]
    else:
        procs = [olmopt("study", "run", name, "--storage", url, "--quiet", "--workers", str(workers))]
    assert all(p.wait() == 0 for p in procs)
    elapsed = time.perf_counter() - start
    from olmopt.search.campaign import Campaign, delete_campaign

    campaign = Campaign.load(name, url)
    complete = [
        t
        for stage in campaign.plan
        if (study := campaign.existing_stage_study(stage)) is not None
        for t in study.get_trials(deepcopy=False)
        if t.state.name == "COMPLETE"
    ]
    span = max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)
    evaluated = sum("reused" not in t.user_attrs for t in complete)
    delete_campaign(campaign.storage, name)  # a shared server keeps nothing of the benchmark
    return elapsed, span.total_seconds(), len(complete), evaluated


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", type=Path, default=REPO / "storage" / "zoo-small")
    parser.add_argument("--postgres", default=os.environ.get("OLMOPT_TEST_POSTGRES_URL"))
    parser.add_argument(
        "--tensor-layers", default="0,1,2,3,4,5", help="layers whose units get tensor stages, e.g. 2,3"
    )
    args = parser.parse_args()
    layers = [int(x) for x in args.tensor_layers.split(",")]
    print(
        "| setup | workers | trials (evaluated) | wall s (with start-up) | campaign s | trials/min | "
        "speed-up | speed-up with start-up |\n|---|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        setups = [
            (
                "SQLite, --workers K",
                lambda k: run(f"sqlite:///{tmp}/w{k}.db", args.zoo, tmp, k, False, layers),
            )
        ]
        if args.postgres:
            setups.append(
                ("PostgreSQL, K processes", lambda k: run(args.postgres, args.zoo, tmp, k, True, layers))
            )
        for label, fn in setups:
            base: tuple[float, float] | None = None
            for k in (1, 2):
                wall, span, trials, evaluated = fn(k)
                rate, wall_rate = 60 * trials / span, 60 * trials / wall
                base = base or (rate, wall_rate)
                print(
                    f"| {label} | {k} | {trials} ({evaluated}) | {wall:.1f} | {span:.1f} | {rate:.1f} | "
                    f"{rate / base[0]:.2f}x | {wall_rate / base[1]:.2f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
