"""Storage overhead per trial: enqueue + pop + record attrs/constraints + tell, with no evaluation.

    python benchmarks/bench_storage.py [--trials 100] [--postgres URL] [--mysql URL]

Prints a markdown table (ms per trial, median of 3 rounds) for SQLite and, when given or set in
OLMOPT_TEST_POSTGRES_URL / OLMOPT_TEST_MYSQL_URL, PostgreSQL and MySQL.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import uuid

import optuna

from olmopt.search import trials as T
from olmopt.search.storage import open_storage, redact

optuna.logging.set_verbosity(optuna.logging.WARNING)


def per_trial_ms(url: str, trials: int) -> float:
    storage = open_storage(url)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize"] * 4)
    for i in range(trials):
        study.enqueue_trial({"donor": f"m{i}"}, user_attrs={T.LABEL_ATTR: f"m{i}"})
    labels = [f"m{i}" for i in range(trials)]
    start = time.perf_counter()
    while (trial := T.pop_waiting(study)) is not None:
        label = trial.suggest_categorical("donor", labels)
        metrics = {f"o{k}": 0.5 + 0.01 * k for k in range(4)}
        constraints = {f"o{k}.vs_base": -0.1 for k in range(4)}
        T.record_result(trial, metrics, constraints, True, json.dumps({"base": label}))
        study.tell(trial, list(metrics.values()))
    elapsed = time.perf_counter() - start
    optuna.delete_study(study_name=name, storage=storage)
    return 1000 * elapsed / trials


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--postgres", default=os.environ.get("OLMOPT_TEST_POSTGRES_URL"))
    parser.add_argument("--mysql", default=os.environ.get("OLMOPT_TEST_MYSQL_URL"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"SQLite": f"sqlite:///{tmp}/bench.db", "journal file": f"journal:{tmp}/bench.log"}
        if args.postgres:
            urls["PostgreSQL"] = args.postgres
        if args.mysql:
            urls["MariaDB/MySQL"] = args.mysql
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.trials} "
            "trials/round"
        )
        print("| storage | URL | ms per trial (median of 3) |\n|---|---|---|")
        for label, url in urls.items():
            runs = [per_trial_ms(url, args.trials) for _ in range(3)]
            print(f"| {label} | `{redact(url)}` | {statistics.median(runs):.1f} |")


if __name__ == "__main__":
    main()
