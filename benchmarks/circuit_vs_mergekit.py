"""Time and memory of olmopt's merges (circuit, della, ties, dare_ties) against mergekit's on the same files.

Usage:
  python benchmarks/make_big_models.py                  # once: storage/bench-big/{A,B,C}, 3 x 309M bf16
  python benchmarks/circuit_vs_mergekit.py [--root storage/bench-big] [--runs circuit,della,mergekit-della]
  python benchmarks/circuit_vs_mergekit.py --setting single --repeats 3 \
      --runs ties,mergekit-ties,dare_ties,mergekit-dare_ties,ties-cold

Each olmopt run is compared with mergekit's run of the same method (``mergekit-ties`` for ``ties``;
circuit with ``mergekit-della``), same parameters: weight 0.5 and density 0.5 per variant, lambda 1;
normalize on for della and ties, off for dare_ties (each method's mergekit default); seed 0.

Each merge runs as a subprocess under ``/usr/bin/time -v`` (wall, user, sys, max RSS) while this script
samples the merge process's ``RssAnon`` (private memory; max RSS also counts mmap'd input pages) every
50 ms. ``--repeats N`` runs the whole list N times in turn (olmopt and mergekit alternate) and reports
medians. Prints a markdown table for BENCHMARKS.md plus the load average before and after (the machine
may be shared: CPU time is the contention-robust figure).

Threads (``--setting``): ``single`` runs both single-threaded (``OMP_NUM_THREADS=1``, olmopt
``--threads 1``); ``default`` leaves both at their defaults (mergekit: torch's threads, one per core;
olmopt: 2 merge workers of one torch thread each). ``NAME-cold`` runs olmopt's ``NAME`` with an empty
``OLMOPT_CACHE_DIR`` (the model-class check builds its expected tensors again: a first merge).

mergekit lives in its own venv (torch first, so pip keeps the CPU build; ``--mergekit-venv`` elsewhere):
  python3 -m venv storage/mk-venv && storage/mk-venv/bin/pip install torch==2.13.0 \
    && storage/mk-venv/bin/pip install mergekit
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MK_VENV = REPO / "storage" / "mk-venv"
MK_HOWTO = (
    f"python3 -m venv {MK_VENV} && {MK_VENV}/bin/pip install torch==2.13.0 && "
    f"{MK_VENV}/bin/pip install mergekit"
)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass
class Result:
    name: str
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float
    peak_anon_mb: float
    rc: int


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _rss_anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sample(time_pid: int, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        tree, frontier = [], _children(time_pid)
        while frontier:
            pid = frontier.pop()
            tree.append(pid)
            frontier.extend(_children(pid))
        peak[0] = max(peak[0], sum(_rss_anon_kb(pid) for pid in tree))
        stop.wait(0.05)


def run_timed(name: str, command: list[str], env: dict[str, str]) -> Result:
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        process = subprocess.Popen(
            ["/usr/bin/time", "-v", "-o", report.name, *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        stop, peak = threading.Event(), [0]
        sampler = threading.Thread(target=_sample, args=(process.pid, stop, peak), daemon=True)
        sampler.start()
        _, stderr = process.communicate()
        stop.set()
        sampler.join()
        text = Path(report.name).read_text()
    if process.returncode != 0:
        print(f"{name} failed (exit {process.returncode}):\n{stderr[-2000:]}", file=sys.stderr)

    def field(label: str) -> str:
        match = re.search(rf"{re.escape(label)}: (.+)", text)
        return match.group(1).strip() if match else "0"

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(wall.split(":"))))
    return Result(
        name,
        seconds,
        float(field("User time (seconds)")),
        float(field("System time (seconds)")),
        int(field("Maximum resident set size (kbytes)")) / 1024,
        peak[0] / 1024,
        process.returncode,
    )


# mergekit method -> (per-model parameters, top-level parameters); olmopt's flags below say the same
MERGEKIT_PARAMS = {
    "della": ("{weight: 0.5, density: 0.5, epsilon: 0.1}", "{lambda: 1.0, normalize: true}"),
    "ties": ("{weight: 0.5, density: 0.5}", "{lambda: 1.0, normalize: true}"),
    "dare_ties": ("{weight: 0.5, density: 0.5}", "{lambda: 1.0, normalize: false, rescale: true}"),
}


def mergekit_config(root: Path, path: Path, method: str) -> None:
    per_model, top = MERGEKIT_PARAMS[method]
    path.write_text(
        f"""merge_method: {method}
base_model: {root / "A"}
models:
  - model: {root / "B"}
    parameters: {per_model}
  - model: {root / "C"}
    parameters: {per_model}
parameters: {top}
dtype: bfloat16
"""
    )


def compare_outputs(ours: Path, theirs: Path) -> tuple[float, float]:
    """(share of elements equal bit for bit, largest absolute difference) between two model directories."""
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        out = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                out.update(dict.fromkeys(handle.keys(), file))
        return out

    mine, other = tensors(ours), tensors(theirs)
    equal = total = 0
    worst = 0.0
    for name, file in mine.items():
        with safe_open(str(file), "pt") as a, safe_open(str(other[name]), "pt") as b:
            x, y = a.get_tensor(name).float(), b.get_tensor(name).float()
        equal += int((x == y).sum())
        total += x.numel()
        worst = max(worst, float((x - y).abs().max()))
    return equal / total, worst


def reference_of(run: str) -> str:
    """The mergekit run an olmopt run is compared with."""
    method = run.removeprefix("mergekit-")
    return f"mergekit-{method}" if method in MERGEKIT_PARAMS else "mergekit-della"


def _median(results: list[Result]) -> Result:
    ok = [r for r in results if r.rc == 0] or results
    return Result(
        ok[0].name,
        *(statistics.median(getattr(r, f) for r in ok) for f in ("wall_s", "user_s", "sys_s")),
        statistics.median(r.max_rss_mb for r in ok),
        statistics.median(r.peak_anon_mb for r in ok),
        max(r.rc for r in results),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "storage" / "bench-big")
    parser.add_argument("--runs", default="startup,circuit,della,mergekit-della")
    parser.add_argument("--setting", choices=("single", "default"), default="single", help="threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the whole list, in turn")
    parser.add_argument("--mergekit-venv", type=Path, default=MK_VENV, help=f"mergekit's venv ({MK_VENV})")
    args = parser.parse_args()
    root = args.root.resolve()
    if not all((root / n / "config.json").is_file() for n in "ABC"):
        print(f"models missing under {root}: run python benchmarks/make_big_models.py first", file=sys.stderr)
        return 1
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    mergekit_yaml = args.mergekit_venv / "bin" / "mergekit-yaml"
    if any(r.startswith("mergekit-") for r in runs) and not mergekit_yaml.is_file():
        print(f"mergekit venv missing; create it with:\n  {MK_HOWTO}", file=sys.stderr)
        runs = [r for r in runs if not r.startswith("mergekit-")]
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=REPO / "storage"))
    env = {**os.environ, **OFFLINE}
    for name in ("OMP_NUM_THREADS", "OLMOPT_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    threads = []
    if args.setting == "single":
        env.update(OMP_NUM_THREADS="1", OLMOPT_THREADS="1")
        threads = ["--threads", "1"]
    olmopt_cli = [sys.executable, "-m", "olmopt.cli", "merge", "circuit", str(root / "A"), str(root / "B")]
    olmopt_cli += [str(root / "C"), "--quiet", *threads]
    commands = {
        "circuit": [*olmopt_cli, "--out", str(work / "circuit")],
        "della": [*olmopt_cli, "--method", "della", "--density", "0.5", "--epsilon", "0.1"]
        + ["--weights", "0.5", "0.5", "--out", str(work / "della")],
        "task_arithmetic": [*olmopt_cli, "--method", "task_arithmetic", "--out", str(work / "ta")],
        "ties": [*olmopt_cli, "--method", "ties", "--density", "0.5", "--weights", "0.5", "0.5"]
        + ["--lambda", "1", "--normalize", "--out", str(work / "ties")],
        "dare_ties": [*olmopt_cli, "--method", "dare_ties", "--density", "0.5", "--weights", "0.5", "0.5"]
        + ["--lambda", "1", "--no-normalize", "--rescale", "--seed", "0", "--out", str(work / "dare_ties")],
        "startup": [sys.executable, "-m", "olmopt.cli", "merge", "circuit", "--help"],
    }
    for method in MERGEKIT_PARAMS:
        mergekit_config(root, work / f"mk-{method}.yaml", method)
        commands[f"mergekit-{method}"] = [
            str(mergekit_yaml), str(work / f"mk-{method}.yaml"), str(work / f"mk-{method}"),
            "--random-seed", "0",
        ]  # fmt: skip
    for name in [r for r in runs if r.endswith("-cold") and r.removesuffix("-cold") in commands]:
        warm = commands[name.removesuffix("-cold")]
        commands[name] = [*warm[: warm.index("--out") + 1], str(work / name)]
    outputs = {n: Path(c[c.index("--out") + 1]) for n, c in commands.items() if "--out" in c}
    outputs.update({n: Path(c[2]) for n, c in commands.items() if n.startswith("mergekit-")})
    load_before = os.getloadavg()
    results: dict[str, list[Result]] = {name: [] for name in runs}
    agreement: dict[str, tuple[float, float]] = {}
    try:
        for repeat in range(args.repeats):
            for name in runs:
                if name not in commands:
                    print(f"unknown run {name!r} (choose from {', '.join(commands)})", file=sys.stderr)
                    return 2
                label = name if name.startswith("mergekit") else f"olmopt {name}"
                label = "olmopt CLI start-up only (--help)" if name == "startup" else label
                run_env = dict(env)
                if name.endswith("-cold"):
                    run_env["OLMOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="cold-cache-", dir=work)
                if name in outputs:
                    shutil.rmtree(outputs[name], ignore_errors=True)  # the previous repeat's
                print(f"[{repeat + 1}/{args.repeats}] running {label} ...", file=sys.stderr)
                result = run_timed(label, commands[name], run_env)
                print(
                    f"  {result.wall_s:.1f} s wall, {result.user_s + result.sys_s:.1f} s CPU", file=sys.stderr
                )
                results[name].append(result)
            if repeat == 0:
                agreement = {
                    method: compare_outputs(work / method, work / f"mk-{method}")
                    for method in ("ties",)  # deterministic: the random methods draw differently
                    if (work / method).is_dir() and (work / f"mk-{method}").is_dir()
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    medians = {name: _median(rs) for name, rs in results.items() if rs}
    done = {run: r for run, r in medians.items() if r.rc == 0}
    print(
        f"setting {args.setting}, {args.repeats} repeat(s), medians\n\n"
        "| merge (3 x 309M bf16) | wall s | user+sys s | max RSS MB | peak RssAnon MB | wall / mergekit | "
        "CPU / mergekit | max RSS / mergekit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run, r in medians.items():
        reference = done.get(reference_of(run.removesuffix("-cold")))
        cpu = r.user_s + r.sys_s
        ratio_wall = f"{r.wall_s / reference.wall_s:.2f}" if reference else "-"
        ratio_cpu = f"{cpu / (reference.user_s + reference.sys_s):.2f}" if reference else "-"
        ratio_rss = f"{r.max_rss_mb / reference.max_rss_mb:.2f}" if reference else "-"
        status = "" if r.rc == 0 else f" (exit {r.rc})"
        walls = "/".join(f"{x.wall_s:.1f}" for x in results[run])
        print(
            f"| {r.name}{status} | {r.wall_s:.1f} ({walls}) | {cpu:.1f} | {r.max_rss_mb:.0f} | "
            f"{r.peak_anon_mb:.0f} | {ratio_wall} | {ratio_cpu} | {ratio_rss} |"
        )
    for method, (equal, worst) in agreement.items():
        print(
            f"\n{method}: olmopt and mergekit agree on {100 * equal:.3f} % of the weights bit for bit; "
            f"largest |difference| {worst:.3g}"
        )
    print(
        f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} "
        "CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
