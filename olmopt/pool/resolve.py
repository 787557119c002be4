"""Resolve a model reference (local directory or hub id) to a local directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

from olmopt.errors import ModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]


def resolve_model(ref: str, base_dir: Path | None = None, revision: str | None = None) -> Path:
    """Local directory for ``ref``.

    A path that exists wins (relative paths are tried against ``base_dir`` first). Otherwise ``ref``
    must look like a hub id (``org/name``) and is fetched with huggingface_hub (safetensors, configs and
    tokenizer files only; honours HF_HUB_OFFLINE). Any failure is a one-line ModelError naming the model.
    """
    candidates = [Path(ref).expanduser()]
    if base_dir is not None and not Path(ref).is_absolute():
        candidates.insert(0, base_dir / ref)
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    if not _HUB_ID.match(ref):
        raise ModelError(f"model {ref}: no such directory and not a hub id (org/name)")
    for path in candidates:  # `zoo/base` after zoo/base was deleted: a local path, not a hub id
        if (
            path.parent.is_dir()
            and path.parent.resolve() != Path.cwd().resolve()
            and str(path.parent) not in ("", ".")
        ):
            raise ModelError(
                f"model {ref}: no such directory {path} (its folder {path.parent} exists; not fetched from "
                "the hub)"
            )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id=ref, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # hub errors come in many types; one line is what users need
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else ""
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"model {ref}: cannot fetch from the hub{hint}: {reason}") from None
    return Path(local)
