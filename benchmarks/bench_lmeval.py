"""Per-candidate cost of an lm-eval objective vs olmopt's own evaluator on the same items.

Usage: python benchmarks/bench_lmeval.py [--zoo storage/zoo-tiny] [--repeats 5] [--profile]

Both paths score the tiny zoo's pool models (each a candidate patched into the resident base) on the
search part of the shipped lm-eval tasks (objectives/lmeval: zoo_mc 150 documents, zoo_add 150):

- lm-eval: ``kind: lm_eval`` objectives (acc of zoo_mc by letter log-likelihood, exact_match of
  zoo_add by greedy generation up to 8 tokens or EOS), scored through lm-eval's HFLM on the resident
  model (``olmopt.evaluate.lmeval``);
- olmopt: the same documents written as olmopt datasets (mc_choices format, ShareGPT) scored with
  ``mc_accuracy`` (letter logits) and ``accuracy`` (KV-cached greedy, stop at the first mismatch).

Reported: median wall time per candidate over ``--repeats`` passes, per task and together, the ratio,
and (``--profile``) where the lm-eval path spends its time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OLMOPT_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from olmopt.config import StudyConfig  # noqa: E402
from olmopt.recipe import Recipe  # noqa: E402
from olmopt.runtime import configure_threads  # noqa: E402
from olmopt.search.api import preflight  # noqa: E402
from olmopt.search.context import EvalContext  # noqa: E402

TASKS = {
    "mc": ("zoo_mc", "acc", "mc_choices.json", "mc_accuracy"),
    "add": ("zoo_add", "exact_match", "add.json", "accuracy"),
}


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}"
    )


def config(zoo: Path, objectives: list[dict[str, Any]]) -> StudyConfig:
    models = [str(zoo / m) for m in ("base", "spec_add", "spec_rev", "spec_mc", "spec_fact")]
    return StudyConfig.model_validate(
        {"name": "bench", "pool": {"models": models}, "objectives": objectives, "root": str(REPO),
         "decisions": {"base": {"model": models[0]}}}
    )  # fmt: skip


def lm_eval_config(zoo: Path, names: list[str]) -> StudyConfig:
    objs = [
        {"name": n, "kind": "lm_eval", "task": TASKS[n][0], "include_path": "objectives/lmeval",
         "metric": TASKS[n][1], "apply_chat_template": True, "held_out": 0.25}
        for n in names
    ]  # fmt: skip
    cfg = config(zoo, objs)
    preflight(cfg)
    return cfg


def olmopt_config(zoo: Path, names: list[str], lm_ctx: EvalContext, tmp: Path) -> StudyConfig:
    """The documents of the lm-eval search parts as olmopt datasets (item i of the source = document i)."""
    assert lm_ctx.lm_eval is not None
    objs = []
    for obj in lm_ctx.lm_eval.objectives:
        source = json.loads((REPO / "objectives" / TASKS[obj.name][2]).read_text())
        items = [source[i] for i in lm_ctx.lm_eval.doc_ids(obj, "search")]
        path = tmp / f"{obj.name}.json"
        path.write_text(json.dumps(items))
        objs.append({"name": obj.name, "dataset": str(path), "metric": TASKS[obj.name][3], "held_out": 0.0})
    return config(zoo, objs)


def per_candidate(
    contexts: list[EvalContext], recipes: list[Recipe], repeats: int
) -> list[tuple[float, float]]:
    """(wall, CPU) medians over passes of the mean seconds per candidate, per context; the contexts take
    turns within each pass so that load from other processes hits them alike (CPU time, which
    contention inflates far less, is the figure to compare on a busy machine)."""
    wall: list[list[float]] = [[] for _ in contexts]
    cpu: list[list[float]] = [[] for _ in contexts]
    for _ in range(repeats):
        for i, ctx in enumerate(contexts):
            start, start_cpu = time.perf_counter(), time.process_time()
            for r in recipes:
                ctx.score(r)
            wall[i].append((time.perf_counter() - start) / len(recipes))
            cpu[i].append((time.process_time() - start_cpu) / len(recipes))
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu, strict=True)]


def profile(fn: Callable[[], None]) -> list[tuple[str, float]]:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    buckets = {
        "model forward (torch modules)": ("torch/nn/modules/module.py", "_call_impl"),
        "HF generate() machinery": ("transformers/generation/utils.py", "generate"),
        "lm-eval loglikelihood loop": ("lm_eval/models/huggingface.py", "_loglikelihood_tokens"),
        "lm-eval generate_until loop": ("lm_eval/models/huggingface.py", "generate_until"),
        "filters + process_results": ("olmopt/evaluate/lmeval.py", "_score"),
    }
    out = []
    for label, (file, func) in buckets.items():
        cum = sum(v[3] for k, v in stats.stats.items() if k[0].endswith(file) and k[2] == func)  # type: ignore[attr-defined]
        out.append((label, cum))
    out.append(("total (profiled, inflated by cProfile)", total))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(REPO / "storage/zoo-tiny"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    configure_threads(1)
    zoo = Path(args.zoo)
    print(f"machine: {machine()}")
    lm_ctx = EvalContext(lm_eval_config(zoo, list(TASKS)))
    lm_ctx.prepare()
    recipes = [Recipe(base=m) for m in lm_ctx.config.pool.models]
    with tempfile.TemporaryDirectory() as tmp:
        ol_ctx = EvalContext(olmopt_config(zoo, list(TASKS), lm_ctx, Path(tmp)))
        ol_ctx.prepare()
        rows = []
        for names in (["mc"], ["add"], list(TASKS)):
            lm_one = (
                EvalContext(lm_eval_config(zoo, names), pool=lm_ctx.pool)
                if len(names) < len(TASKS)
                else lm_ctx
            )
            ol_one = (
                EvalContext(olmopt_config(zoo, names, lm_one, Path(tmp)), pool=ol_ctx.pool)
                if len(names) < len(TASKS)
                else ol_ctx
            )
            lm_one.prepare()
            ol_one.prepare()
            for ctx in (lm_one, ol_one):
                ctx.score(recipes[0])  # warm-up
            t_lm, t_ol = per_candidate([lm_one, ol_one], recipes, args.repeats)
            agree = all(abs(lm_one.score(r)[n] - ol_one.score(r)[n]) < 1e-6 for r in recipes for n in names)
            rows.append(("+".join(names), t_lm, t_ol, agree))
    print(
        f"load average {os.getloadavg()[0]:.1f}; ms per candidate, wall (CPU), medians over {args.repeats} "
        "passes"
    )
    print("| objectives | lm-eval | olmopt | ratio | same values |\n|---|---:|---:|---:|---|")
    for label, (lm_w, lm_c), (ol_w, ol_c), agree in rows:
        print(
            f"| {label} | {lm_w * 1e3:.1f} ({lm_c * 1e3:.1f}) | {ol_w * 1e3:.1f} ({ol_c * 1e3:.1f}) "
            f"| {lm_w / ol_w:.2f} ({lm_c / ol_c:.2f}) | {agree} |"
        )
    if args.profile:
        print("\nlm-eval path, one pass over the candidates (cumulative seconds):")
        for label, secs in profile(lambda: [lm_ctx.score(r) for r in recipes] and None):
            print(f"  {label:<40} {secs:7.3f}")


if __name__ == "__main__":
    main()
