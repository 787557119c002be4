"""Device, dtype and thread choices shared by every command."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when available (or when asked), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; float32 on CPU (CPUs without bf16 units run bf16 about 4x slower)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads. Default: ``OLMOPT_THREADS`` or 1.

    One thread is the safe default: two OpenMP threads on a busy 2-core machine spin and run 10-100x
    slower. Returns the number set.
    """
    from olmopt.envvars import env_int

    n = threads or env_int("OLMOPT_THREADS", 1)
    torch.set_num_threads(max(1, n))
    return n


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and info logs (olmopt draws its own)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cache_kwarg(forward: Any) -> str:
    """The name a model's forward takes its KV cache by: ``cache`` in current transformers 5 (the old
    ``past_key_values`` warns that it goes in 5.40), ``past_key_values`` in early 5.x releases."""
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "cache"
    return "cache" if "cache" in parameters or "past_key_values" not in parameters else "past_key_values"
