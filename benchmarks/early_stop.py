"""Item savings of early stopping: a greedy campaign with ``evaluation.early_stop`` off vs on.

    python benchmarks/early_stop.py [--study studies/zoo-tiny.yaml] [--alpha 0.05] [--chunk 20]

Runs the study file's campaign (a temporary SQLite storage) once with early stopping off and once per
variant with it on (``selection.score`` copeland, as in the file, and mean), and prints a markdown table:
item evaluations (sum of the trials' ``n_items``), trials stopped early (PRUNED), wall and CPU time,
and whether the final Recipe equals the one without early stopping. See docs/early_stop.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from olmopt.cli import main
from olmopt.search.campaign import Campaign
from olmopt.textio import load_yaml, read_text

ROOT = Path(__file__).resolve().parents[1]


def run(
    study_file: Path, tmp: Path, name: str, early_stop: dict[str, Any], score: str | None
) -> dict[str, Any]:
    import yaml

    data = load_yaml(read_text(study_file))
    data["name"] = name
    data["root"] = str(ROOT)
    data.setdefault("evaluation", {})["early_stop"] = early_stop
    if score:
        data.setdefault("selection", {})["score"] = score
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp}/{name}.db"
    assert main(["study", "create", str(path), "--storage", url]) == 0
    wall, cpu = time.perf_counter(), time.process_time()
    assert main(["study", "run", name, "--storage", url, "--quiet"]) == 0
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    campaign = Campaign.load(name, url)
    trials = []
    for stage in campaign.plan:
        study = campaign.existing_stage_study(stage)
        trials += study.get_trials() if study is not None else []
    return {
        "items": sum(int(t.user_attrs.get("n_items", 0)) for t in trials),
        "trials": len(trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "wall": wall,
        "cpu": cpu,
        "recipe": campaign.final_recipe(),
    }


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=ROOT / "studies" / "zoo-tiny.yaml")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--chunk", type=int, default=20)
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"OLMOPT_THREADS={os.environ.get('OLMOPT_THREADS', '1')}; study {args.study}"
    )
    on = {"mode": "on", "alpha": args.alpha, "chunk": args.chunk}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "off": run(args.study, Path(tmp), "bench-off", {"mode": "off"}, None),
            "on (copeland)": run(args.study, Path(tmp), "bench-on", on, None),
            "off (mean)": run(args.study, Path(tmp), "bench-off-mean", {"mode": "off"}, "mean"),
            "on (mean)": run(args.study, Path(tmp), "bench-on-mean", on, "mean"),
        }
    print(
        "\n| early stop | item evaluations | vs off | trials | pruned | wall s | cpu s | same Recipe as off |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, r in rows.items():
        base = rows["off (mean)" if "mean" in label else "off"]
        print(
            f"| {label} | {r['items']} | {r['items'] / base['items']:.0%} | {r['trials']} | {r['pruned']} | "
            f"{r['wall']:.1f} | {r['cpu']:.1f} | {'yes' if r['recipe'] == base['recipe'] else 'no'} |"
        )


if __name__ == "__main__":
    main_()
