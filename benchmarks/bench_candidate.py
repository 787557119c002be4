"""Per-candidate cost of a per-layer stage: patch + evaluate + undo vs the bare evaluation.

Usage: python benchmarks/bench_candidate.py [--zoo auto|tiny|small|random] [--repeats 5] [--layers 4]

Candidates are every (layer, donor) swap of the pool around the base, as a per-layer stage runs them.
For each pass over the stage we time, per candidate, (a) apply + evaluate + undo, (b) the Evaluator on
the unpatched model (the bare forward passes of the same evaluation) and (c) apply + undo alone.
Overhead = (a - b) / b. Wall and CPU (process_time) medians over passes; target overhead <= 5 %.

The helpers here (machine line, model/objective setup, timing) are shared with bench_prefix_cache.py
and bench_exact_match.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OLMOPT_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from transformers import AutoTokenizer  # noqa: E402

from olmopt.evaluate.engine import Evaluator, Objective  # noqa: E402
from olmopt.patch import WorkingModel  # noqa: E402
from olmopt.pool.model_pool import ModelPool  # noqa: E402
from olmopt.recipe import Recipe  # noqa: E402
from olmopt.runtime import configure_threads, quiet_transformers  # noqa: E402

ZOO_OBJECTIVES = [("add", "add.json", "token_accuracy"), ("rev", "rev.json", "token_accuracy"),
                  ("fact", "fact.json", "token_accuracy"),
                  ("mc", "mc_choices.json", "mc_accuracy")]  # fmt: skip


@dataclass
class Setup:
    """A pool, its base's tokenizer, the objectives and a label saying which models these are."""

    pool: ModelPool
    tokenizer: object
    objectives: list[Objective]
    label: str


def machine() -> str:
    """CPU model, cores and torch threads (and the GPU when one is used)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
        f"thread(s), load average {load:.1f} at start"
    )


def _random_datasets(root: Path, n: int = 96) -> list[Objective]:
    """ShareGPT reversal and multiple-choice files for a random family (char tokenizer)."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8))) for _ in range(n)]
    rev = [
        {"conversation": [{"from": "human", "value": f"rev {w}"}, {"from": "gpt", "value": w[::-1]}]}
        for w in words
    ]
    (root / "rev.json").write_text(json.dumps(rev))
    mc = [{"question": "larger?", "choices": [str(i), str(i + 7)], "answer": 1} for i in range(n)]
    (root / "mc.json").write_text(json.dumps(mc))
    return [
        Objective("rev", root / "rev.json", "token_accuracy"),
        Objective("rev_bigram", root / "rev.json", "bigram_loss"),
        Objective("mc", root / "mc.json", "mc_accuracy"),
    ]


def _random_family(root: Path, layers: int, hidden: int) -> dict[str, Path]:
    """A random llama base and three noisy copies (char tokenizer), ``layers`` x ``hidden``."""
    from _models import _noisy, char_tokenizer, make_config
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(make_config("llama", layers, hidden, vocab=len(tok)))
    paths = {}
    for k, name in enumerate(["base", "d1", "d2", "d3"]):
        model = base if k == 0 else _noisy(base, 0.5, k)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def load_setup(zoo: str = "auto", layers: int = 4, hidden: int = 64) -> Setup:
    """The tiny zoo when built, else the small zoo, else a random llama family (``layers`` x ``hidden``)."""
    quiet_transformers()
    candidates = {"tiny": REPO / "storage" / "zoo-tiny", "small": REPO / "storage" / "zoo-small"}
    order = ["tiny", "small"] if zoo == "auto" else [zoo] if zoo in candidates else []
    for size in order:
        root = candidates[size]
        if (root / "zoo.json").is_file():
            manifest = json.loads((root / "zoo.json").read_text())
            refs = [str(root / m["path"]) for m in manifest["models"]]
            pool = ModelPool(refs)
            objectives = [Objective(n, REPO / "objectives" / f, m) for n, f, m in ZOO_OBJECTIVES]
            return Setup(
                pool, AutoTokenizer.from_pretrained(refs[0]), objectives, f"{size} zoo ({root.name})"
            )
    if zoo in candidates:
        raise SystemExit(f"{candidates[zoo]} is not built (run `olmopt zoo build --size {zoo}`)")
    root = Path(tempfile.mkdtemp(prefix="olmopt-bench-"))
    fam = _random_family(root, layers, hidden)
    pool = ModelPool([str(p) for p in fam.values()])
    label = f"random llama family ({layers} layers, hidden {hidden}, 4 models)"
    return Setup(pool, AutoTokenizer.from_pretrained(fam["base"]), _random_datasets(root), label)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall s, CPU s) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def layer_stage(pool: ModelPool) -> list[Recipe]:
    """Every (layer, donor) swap around the first model: the candidates of a per-layer stage."""
    base, *donors = pool.names
    return [Recipe(base=base, layers={i: d}) for i in range(pool.adapter.num_layers) for d in donors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="auto", choices=["auto", "tiny", "small", "random"])
    parser.add_argument("--layers", type=int, default=4, help="depth of the random family (when used)")
    parser.add_argument("--hidden", type=int, default=64, help="width of the random family (when used)")
    parser.add_argument("--repeats", type=int, default=5, help="passes over the stage")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    configure_threads()
    setup = load_setup(args.zoo, args.layers, args.hidden)
    setup.pool.check_homology()
    wm = WorkingModel(setup.pool, setup.pool.names[0], device="cpu")
    ev = Evaluator(wm.model, setup.tokenizer, setup.objectives, batch_size=args.batch_size)
    ev.prepare()
    ev.evaluate()  # warm-up (allocator, first-call costs)
    stage = layer_stage(setup.pool)

    cand_w, cand_c, bare_w, bare_c, patch_w, patch_c = [], [], [], [], [], []
    for _ in range(args.repeats):
        cw = cc = bw = bc = pw = pc = 0.0
        for recipe in stage:  # interleave so that drift in machine load hits all three alike

            def candidate(r: Recipe = recipe) -> None:
                handle = wm.apply(r)
                ev.evaluate()
                wm.undo(handle)

            def patch_undo(r: Recipe = recipe) -> None:
                wm.undo(wm.apply(r))

            w, c = timed(candidate)
            cw, cc = cw + w, cc + c
            w, c = timed(ev.evaluate)
            bw, bc = bw + w, bc + c
            w, c = timed(patch_undo)
            pw, pc = pw + w, pc + c
        n = len(stage)
        cand_w.append(cw / n), cand_c.append(cc / n), bare_w.append(bw / n), bare_c.append(bc / n)
        patch_w.append(pw / n), patch_c.append(pc / n)

    rows = [
        ("candidate: patch + evaluate + undo", median(cand_w), median(cand_c)),
        ("bare evaluation (unpatched)", median(bare_w), median(bare_c)),
        ("patch + undo alone", median(patch_w), median(patch_c)),
    ]
    items = sum(len(ev.encoded(o, "search")) for o in setup.objectives)
    print(f"Machine: {machine()}")
    print(
        f"Models: {setup.label}; {len(stage)} candidates per pass (every layer x every donor), "
        f"{args.repeats} passes"
    )
    print(
        f"Objectives: {', '.join(f'{o.name}:{o.metric}' for o in setup.objectives)} ({items} search items)\n"
    )
    print("| per candidate | wall ms (median) | CPU ms (median) |")
    print("|---|---:|---:|")
    for name, w, c in rows:
        print(f"| {name} | {1000 * w:.2f} | {1000 * c:.2f} |")
    over_w = (median(cand_w) - median(bare_w)) / median(bare_w)
    over_c = (median(cand_c) - median(bare_c)) / median(bare_c)
    share_c = median(patch_c) / median(bare_c)
    print(
        f"\nOverhead (candidate vs bare evaluation): wall {100 * over_w:+.1f} %, CPU {100 * over_c:+.1f} % "
        "(target <= 5 %)"
    )
    print(f"patch + undo alone: {100 * share_c:.2f} % of the bare evaluation's CPU time")


if __name__ == "__main__":
    main()
