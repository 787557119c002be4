"""Time `olmopt zoo build` (fresh, --force) per size: wall and CPU seconds of the whole command.

Usage: python benchmarks/zoo_build.py [--sizes tiny small] [--arch llama] [--threads 1]
Run on an idle machine for budget numbers (tiny < 90 s, small < 5 min); CPU time is the figure that
survives contention.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = {"tiny": 90, "small": 300}


def time_build(size: str, arch: str, threads: int, out: Path) -> tuple[float, float, int]:
    """(wall s, CPU s of the child, exit code) of one fresh build."""
    env = dict(os.environ, OLMOPT_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [
        sys.executable,
        "-m",
        "olmopt.cli",
        "zoo",
        "build",
        "--out",
        str(out),
        "--size",
        size,
        "--arch",
        arch,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    rc = subprocess.run([*cmd, "--force", "--quiet"], env=env, check=False).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(BUDGET_S))
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OLMOPT_THREADS", "1")))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="zoo-bench-") as tmp:
        for size in args.sizes:
            wall, cpu, rc = time_build(size, args.arch, args.threads, Path(tmp) / size)
            rows.append((size, wall, cpu, rc))
    load = os.getloadavg()[0]
    print(f"| size | arch | threads | wall s | CPU s | budget s | exit | (load avg {load:.1f})")
    print("|---|---|---|---|---|---|---|")
    for size, wall, cpu, rc in rows:
        print(f"| {size} | {args.arch} | {args.threads} | {wall:.1f} | {cpu:.1f} | {BUDGET_S[size]} | {rc} |")
    return max(rc for *_, rc in rows)


if __name__ == "__main__":
    sys.exit(main())
