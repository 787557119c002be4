"""Data loader of the shipped zoo tasks: JSONL files next to this file, read without the network or a cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_file: str, split: str = "test", **_: Any) -> dict[str, datasets.Dataset]:
    """``{split: Dataset}`` from ``data_file`` (relative to this directory)."""
    path = HERE / data_file
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {split: datasets.Dataset.from_list(rows)}
