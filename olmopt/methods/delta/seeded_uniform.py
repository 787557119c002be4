"""Chunk-independent random numbers for per-element sampling (stochastic pruning).

Each (seed, tensor name, stream) gets its own key from a stable hash (blake2b); element ``i`` of that
tensor draws its random number from block ``i // BLOCK``, whose generator is seeded from (key, block).
Any slice ``[start, end)`` therefore gets the same bits whatever the chunking, thread count, memory or
processing order. Draws are 16-bit (``65536`` levels), which is ample for drop probabilities and about
6x cheaper than float32 draws on CPU.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

BLOCK = 1 << 16
LEVELS = 65536.0
INT16_OFFSET = 32768.0


def stream_key(seed: int, name: str, stream: int = 0) -> tuple[int, ...]:
    """A stable 128-bit key (four uint32 words) for one tensor's random stream."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}\x00{int(stream)}".encode(), digest_size=16).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4))


def _block_bits(key: tuple[int, ...], block: int) -> np.ndarray:
    generator = np.random.SFC64(np.random.SeedSequence([*key, block]))
    return generator.random_raw(BLOCK // 4).view(np.int16)


def uniform_int16(key: tuple[int, ...], start: int, end: int) -> torch.Tensor:
    """Uniform int16 draws (all 65536 values equally likely) for elements ``[start, end)``."""
    if end <= start:
        return torch.empty(0, dtype=torch.int16)
    first, last = start // BLOCK, (end - 1) // BLOCK
    bits = np.concatenate([_block_bits(key, block) for block in range(first, last + 1)])
    offset = start - first * BLOCK
    return torch.from_numpy(bits[offset : offset + end - start])


def uniform01(key: tuple[int, ...], start: int, end: int) -> torch.Tensor:
    """Uniform float32 draws in (0, 1) for elements ``[start, end)`` (bin midpoints of 1/65536)."""
    draws = uniform_int16(key, start, end).to(torch.float32)
    return (draws + (INT16_OFFSET + 0.5)) / LEVELS
