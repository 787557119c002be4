"""Session-wide test setup: one torch thread, and the cached tiny llama zoo as fixtures."""

from __future__ import annotations

import os

os.environ["OLMOPT_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
# the zoo's portable CPU kernels for the whole suite: the tiny zoo is built in this process, and
# figures are the same on every x86-64 machine (olmopt.kernels)
from olmopt.kernels import request_portable_kernels  # noqa: E402 - torch-free

request_portable_kernels()

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_ZOO_DIR = REPO_ROOT / "storage" / "zoo-tiny"


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny llama zoo at storage/zoo-tiny (built once, ~1.5 min; reused while zoo.json and hashes match)."""
    from olmopt.zoo import build_zoo
    from olmopt.zoo.build import cached_manifest

    # storage/zoo-tiny is the suite's own cache: one from an older zoo version is rebuilt, not refused
    stale = TINY_ZOO_DIR.exists() and cached_manifest(TINY_ZOO_DIR, "tiny", "llama") is None
    build_zoo(TINY_ZOO_DIR, size="tiny", arch="llama", progress=False, force=stale)
    return TINY_ZOO_DIR


@pytest.fixture(scope="session")
def tiny_manifest(tiny_zoo: Path) -> dict[str, Any]:
    """The parsed zoo.json of the tiny zoo."""
    from olmopt.zoo import load_manifest

    return load_manifest(tiny_zoo)
