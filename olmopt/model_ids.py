"""Public names of pool models: hub ids as they are, local directories by a short name (torch-free).

Model cards and ``merge_report.json`` are meant to be shared: they name models by these ids, never by a
local path. ``study status`` uses the same short names in its table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def short_names(models: list[str]) -> dict[str, str]:
    """Pool model (path or hub id) -> the shortest trailing part of it that no other pool model shares."""
    out: dict[str, str] = {}
    stripped = [m.rstrip("/") for m in models]
    for model, clean in zip(models, stripped, strict=True):
        parts = clean.split("/")
        for n in range(1, len(parts) + 1):
            short = "/".join(parts[-n:])
            if sum(1 for other in stripped if other == short or other.endswith("/" + short)) == 1:
                out[model] = short
                break
        else:
            out[model] = model
    return out


def is_local(ref: str, base_dir: Path | None = None) -> bool:
    """Whether ``ref`` names a local directory (as ``pool.resolve.resolve_model`` would find it)."""
    candidates = [Path(ref).expanduser()]
    if base_dir is not None and not Path(ref).is_absolute():
        candidates.insert(0, base_dir / ref)
    return any(p.is_dir() for p in candidates)


def public_ids(models: list[str], base_dir: Path | None = None) -> dict[str, dict[str, str]]:
    """Pool model -> ``{"id", "source"}``: a hub id is its own id (source ``hub``); a local directory is
    named by its directory name (or as many trailing path parts as make it unique; source ``local``)."""
    short = short_names(models)
    return {
        m: {"id": short[m], "source": "local"} if is_local(m, base_dir) else {"id": m, "source": "hub"}
        for m in models
    }


def renamed_everywhere(obj: Any, mapping: dict[str, str]) -> Any:
    """``obj`` (JSON-like) with every key of ``mapping`` replaced by its value wherever it occurs in a
    string (values and dict keys; labels such as ``"NAME (base)"`` and reasons that quote a model too).
    Longer names are replaced first, so a model whose name extends another's keeps its own id."""
    order = sorted(mapping, key=len, reverse=True)

    def rename(value: Any) -> Any:
        if isinstance(value, dict):
            return {rename(k): rename(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [rename(v) for v in value]
        if isinstance(value, str):
            if value in mapping:
                return mapping[value]
            for name in order:
                if name in value:
                    value = value.replace(name, mapping[name])
        return value

    return rename(obj)
