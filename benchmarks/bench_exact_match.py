"""exact_match on 32-token answers: KV-cached batched greedy decoding vs the seed's loop.

Usage: python benchmarks/bench_exact_match.py [--zoo auto|tiny|small|random] [--samples 32] [--repeats 3]

The dataset asks to reverse 31-letter strings ("rev <31 letters>"), so every answer is 31 characters +
EOS = 32 tokens. Three ways to score it:

* seed loop: OLM's ``compute_exact_match`` - one sample at a time, a full forward (no cache) per
  generated token, all 32 tokens, HEAD scoring (``stop_at_first_mismatch=False``);
* engine, 32 tokens: ``Evaluator.greedy`` (KV cache, left-padded batches) decoding every row for all
  32 tokens (EOS stop disabled), the same work as the seed loop; its tokens must equal the seed's;
* engine, exact_match objective: ``Evaluator.evaluate()`` as a study runs it (stop at the first
  mismatch, early stop when every row stopped).

Target: engine >= 10x faster than the seed loop on the same 32-token work.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_candidate import load_setup, machine, median, timed

from olmopt.evaluate.engine import Evaluator, Objective
from olmopt.patch import WorkingModel
from olmopt.runtime import configure_threads

ANSWER_CHARS = 31


class _NoEos:
    """A tokenizer view without an EOS id, so greedy decoding runs every row to ``max_new``."""

    eos_token_id = -1

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def write_dataset(path: Path, n: int) -> None:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(ANSWER_CHARS)) for _ in range(n)]
    data = [
        {"conversation": [{"from": "human", "value": f"rev {w}"}, {"from": "gpt", "value": w[::-1]}]}
        for w in words
    ]
    path.write_text(json.dumps(data))


@torch.no_grad()
def seed_loop(
    model: torch.nn.Module, prompts: list[list[int]], answers: list[list[int]]
) -> tuple[float, list[list[int]]]:
    """OLM HEAD exact match: per sample, n full forwards without cache; mean of 1 -/+ p_max."""
    scores, rollouts = [], []
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = torch.tensor([prompt])
        toks: list[int] = []
        total = 0.0
        for expected in answer:
            probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[0, -1].float(), dim=-1)
            p, tok = probs.max(dim=-1)
            toks.append(int(tok))
            total += (1 - float(p)) if int(tok) == expected else (1 + float(p))
            ids = torch.cat([ids, tok.view(1, 1)], dim=1)
        scores.append(total / len(answer))
        rollouts.append(toks)
    return sum(scores) / len(scores), rollouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="auto", choices=["auto", "tiny", "small", "random"])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    configure_threads()
    setup = load_setup(args.zoo)
    wm = WorkingModel(setup.pool, setup.pool.names[0], device="cpu")
    path = Path(tempfile.mkdtemp(prefix="olmopt-em-")) / "rev31.json"
    write_dataset(path, args.samples)
    obj = Objective("rev31", path, "exact_match", held_out=0.0)
    ev = Evaluator(wm.model, setup.tokenizer, [obj], batch_size=args.batch_size)
    ev_full = Evaluator(wm.model, _NoEos(setup.tokenizer), [obj], batch_size=args.batch_size)
    enc = ev.encoded(obj, "search")
    assert {len(a) for a in enc.answers} == {ANSWER_CHARS + 1}, "answers must be 32 tokens"
    prompts, answers = enc.prompts, enc.answers
    n_new = ANSWER_CHARS + 1

    def engine_full() -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(prompts), args.batch_size):
            pred, _ = ev_full.greedy(prompts[start : start + args.batch_size], n_new)
            out += pred.tolist()
        return out

    ev.evaluate()  # warm-up
    seed_w, seed_c, full_w, full_c, obj_w, obj_c = [], [], [], [], [], []
    result: dict[str, Any] = {}
    for _ in range(args.repeats):
        w, c = timed(lambda: result.__setitem__("seed", seed_loop(wm.model, prompts, answers)))
        seed_w.append(w), seed_c.append(c)
        w, c = timed(lambda: result.__setitem__("full", engine_full()))
        full_w.append(w), full_c.append(c)
        w, c = timed(lambda: result.__setitem__("obj", ev.evaluate()["rev31"]))
        obj_w.append(w), obj_c.append(c)
    same = result["full"] == result["seed"][1]
    print(f"Machine: {machine()}")
    print(
        f"Models: {setup.label} (base model); {len(prompts)} samples, 32-token answers, batch "
        f"{args.batch_size}"
    )
    print(f"Repeats: {args.repeats} (medians)\n")
    print("| exact_match, 32-token answers | wall s | CPU s | speed-up vs seed (CPU) |")
    print("|---|---:|---:|---:|")
    rows = [
        ("seed loop (full forward per token, no cache, 1 sample)", seed_w, seed_c),
        ("engine: KV-cached batched greedy, all 32 tokens", full_w, full_c),
        ("engine: exact_match objective (early stop at first mismatch)", obj_w, obj_c),
    ]
    for name, w, c in rows:
        print(f"| {name} | {median(w):.3f} | {median(c):.3f} | {median(seed_c) / median(c):.1f}x |")
    print(
        f"\nSpeed-up, same 32-token work: wall {median(seed_w) / median(full_w):.1f}x, "
        f"CPU {median(seed_c) / median(full_c):.1f}x (target >= 10x); greedy tokens identical to the seed "
        f"loop: {same}"
    )
    print(
        f"Scores: seed HEAD exact_match {result['seed'][0]:.4f}; engine objective (stop at mismatch) "
        f"{result['obj']:.4f}"
    )


if __name__ == "__main__":
    main()
