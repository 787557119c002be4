"""Paired bootstrap ties for losses: how often equal candidates tie, how often different ones do not,
and what selection with them costs.

    python benchmarks/bootstrap_ties.py [--pairs 400] [--items 60]

Simulated per-item losses: each item has a difficulty (uniform 0.5-1.5) shared by every candidate,
plus per-candidate noise (sd 0.2). Equal-quality pairs draw the same distribution; shifted pairs add
``--shift`` to one candidate's losses. Prints the share of pairs tied at 0.95 (target: about 95 % of
equal pairs, few shifted pairs) and the wall time of ``select`` over C candidates with the rule.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from olmopt.confidence import selection_ties
from olmopt.select import select

METRIC = {"loss": "bigram_loss"}


def tie_rate(pairs: int, items: int, shift: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    tied = 0
    for _ in range(pairs):
        truth = rng.uniform(0.5, 1.5, items)
        a, b = truth + rng.normal(0, 0.2, items), truth + shift + rng.normal(0, 0.2, items)
        per = {"loss": {"a": dict(enumerate(a)), "b": dict(enumerate(b))}}
        _, rule = selection_ties(None, 0.95, METRIC, {"loss": items}, per)
        assert rule is not None
        tied += rule.tied("loss", float(a.mean()), float(b.mean()), "a", "b")
    return tied / pairs


def select_seconds(candidates: int, items: int) -> float:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.5, 1.5, items)
    per = {
        "loss": {
            f"c{i}": dict(enumerate(truth + rng.normal(0.002 * i, 0.2, items))) for i in range(candidates)
        }
    }
    scores = {"loss": {c: float(np.mean(list(v.values()))) for c, v in per["loss"].items()}}
    start = time.perf_counter()
    _, rule = selection_ties(None, 0.95, METRIC, {"loss": items}, per)
    assert rule is not None
    select(scores, {"loss": "minimize"}, tied=rule.tied)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--shift", type=float, default=0.1)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"load {os.getloadavg()[0]:.1f}; {args.pairs} pairs of {args.items} items, 2000 resamples"
    )
    print("| pairs | tied at 0.95 |\n|---|---|")
    print(f"| equal quality | {tie_rate(args.pairs, args.items, 0.0, 1):.1%} |")
    print(f"| one worse by {args.shift:g} | {tie_rate(args.pairs, args.items, args.shift, 2):.1%} |")
    print("\n| candidates x items | select with bootstrap ties (s) |\n|---|---|")
    for c, n in ((30, 60), (100, 200), (100, 1000)):
        print(f"| {c} x {n} | {select_seconds(c, n):.2f} |")


if __name__ == "__main__":
    main()
