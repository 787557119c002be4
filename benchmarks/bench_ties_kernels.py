"""TIES / DARE-TIES kernels against the previous code (tests/_ties_reference.py) on the big models.

Usage: python benchmarks/bench_ties_kernels.py [--root storage/bench-big] [--layers 3]

Reads every tensor of three models (``make_big_models.py``; ``--layers N``: only the first N layers and
the rest) and merges it in this process with one torch thread, as ``merge circuit`` would (weight 0.5,
density 0.5, lambda 1; normalize on for ties, off for dare_ties; seed 0). Prints the thread CPU
seconds of the current and the previous code, the share spent in the parts of the current code, and
whether the outputs agree bit for bit (they must).
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import _ties_reference as reference  # noqa: E402

from olmopt.methods.delta import _kernels, merge_tensor, trim  # noqa: E402
from olmopt.methods.delta.stream import PreadModel, retain_freed_memory  # noqa: E402

PARTS: collections.Counter[str] = collections.Counter()


def timed(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            PARTS[label] += time.thread_time() - started

    return wrapper


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "storage" / "bench-big")
    parser.add_argument("--layers", type=int, default=None, help="only the first N layers (default all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    models = [PreadModel(args.root / n) for n in "ABC"]
    names = sorted(models[0].entries)
    if args.layers is not None:
        layer = re.compile(r"\.layers\.(\d+)\.")
        names = [n for n in names if not (m := layer.search(n)) or int(m.group(1)) < args.layers]
    trim.select_cut = timed("trim: find the cut", trim.select_cut)  # type: ignore[assignment]
    trim.Cut.apply = timed("trim: apply the cut", trim.Cut.apply)  # type: ignore[method-assign]
    _kernels.elect = timed("sign election", _kernels.elect)  # type: ignore[assignment]
    _kernels.uniform_int16 = timed("random draws", _kernels.uniform_int16)  # type: ignore[assignment]
    elements = sum(math.prod(models[0].entries[n].shape) for n in names)
    print(f"{len(names)} tensors, {elements / 1e6:.1f}M elements per model, one thread\n")
    print("| method | previous code CPU s | now CPU s | speed-up | bit-identical | parts of now (CPU s) |")
    print("|---|---|---|---|---|---|")
    for method in ("ties", "dare_ties"):
        normalize = method == "ties"
        params = {"weights": [0.5, 0.5], "density": 0.5, "normalize": normalize}
        PARTS.clear()
        now = before = 0.0
        identical = True
        for name in names:
            base, *variants = (m.read(name).clone() for m in models)
            started = time.thread_time()
            got = merge_tensor(method, base, variants, params, seed=0, name=name)
            now += time.thread_time() - started
            started = time.thread_time()
            if not base.is_floating_point():
                want = base
            elif method == "ties":
                want = reference.ties(base, variants, [0.5, 0.5], [0.5, 0.5], normalize)
            else:
                want = reference.dare_ties(base, variants, [0.5, 0.5], [0.5, 0.5], 0, name, normalize)
            before += time.thread_time() - started
            identical &= torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
        parts = ", ".join(f"{label} {seconds:.2f}" for label, seconds in PARTS.most_common())
        print(f"| {method} | {before:.2f} | {now:.2f} | {before / now:.1f}x | {identical} | {parts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
