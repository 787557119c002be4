"""Make three ~300M-parameter bf16 Llama models (A, and B, C = A + small noise) for merge benchmarks.

Usage: python benchmarks/make_big_models.py [--root storage/bench-big] [--layers 24] [--force]

Shapes follow the mergekit probe (hidden 1024, 24 layers, 16 heads, FFN 2816, vocab 300: 308.9M
parameters, 618 MB per model). Weights are N(0, 0.02) (norms 1); B and C add Gaussian noise of 2 % of
each tensor's std. Tensors are generated one at a time, so memory stays low.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from olmopt.outdir import ShardedSafetensorsWriter  # noqa: E402

NOISE = 0.02


def big_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=1024,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=2816,
        vocab_size=300,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )


def tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def make_models(root: Path, layers: int, force: bool) -> None:
    names = ["A", "B", "C"]
    if any((root / n).exists() for n in names):
        if not force:
            print(f"{root} already has models (pass --force to rebuild)")
            return
        for n in names:
            shutil.rmtree(root / n, ignore_errors=True)
    config = big_config(layers)
    shapes = tensor_shapes(config)
    writers = {}
    for n in names:
        (root / n).mkdir(parents=True)
        config.save_pretrained(root / n)
        writers[n] = ShardedSafetensorsWriter(root / n, max_shard_bytes=5_000_000_000)
    generator = torch.Generator().manual_seed(0)
    params = 0
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base = torch.ones(shape)
        else:
            base = torch.randn(shape, generator=generator) * 0.02
        params += base.numel()
        writers["A"].add(name, base.to(torch.bfloat16))
        std = float(base.std()) if base.numel() > 1 and float(base.std()) > 0 else 0.02
        for n in names[1:]:
            noisy = base + torch.randn(shape, generator=generator) * (NOISE * std)
            writers[n].add(name, noisy.to(torch.bfloat16))
    for writer in writers.values():
        writer.close()
    print(f"wrote {names} under {root}: {params / 1e6:.1f}M parameters each")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO / "storage" / "bench-big")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    make_models(args.root, args.layers, args.force)
    print(f"{time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
