"""``zoo.json``: reading, writing and the cache check (same arguments and intact weights -> reuse)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from olmopt.errors import InputError

MANIFEST = "zoo.json"
WEIGHTS = "model.safetensors"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The parsed ``zoo.json`` of a zoo directory (InputError when missing or malformed)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError(
            f"zoo {directory}: no {MANIFEST} (build one with `olmopt zoo build --out {directory}`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"zoo {directory}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or "models" not in manifest or "build_key" not in manifest:
        raise InputError(f"zoo {directory}: {MANIFEST} lacks 'models' or 'build_key'")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def reusable(directory: Path, build_key: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest when ``directory`` holds a complete zoo built with ``build_key`` and intact weights."""
    try:
        manifest = load_manifest(directory)
    except InputError:
        return None
    if manifest.get("build_key") != build_key:
        return None
    for model in manifest["models"]:
        weights = directory / model["path"] / WEIGHTS
        if not weights.is_file() or sha256_file(weights) != model["sha256"]:
            return None
    return manifest
