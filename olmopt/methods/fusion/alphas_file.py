"""Fusion alphas files: the seed's ``fusion_alphas.json`` records (or plain lists), read, checked, written."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from olmopt.errors import InputError
from olmopt.methods.fusion.maths import fusion_pairs, fusion_steps
from olmopt.methods.fusion.model import validate_alphas
from olmopt.textio import read_text

_ALPHA_KEYS = ("ratio_i_alpha", "alpha")
_INTO_KEYS = ("layer_to_merge_into", "into")
_REMOVE_KEYS = ("layer_to_remove", "remove")
_STEP_KEYS = {"step", "ratio_j", *_ALPHA_KEYS, *_INTO_KEYS, *_REMOVE_KEYS}


def parse_alphas(
    data: Any, source: str = "alphas", num_layers: int | None = None, steps: int | None = None
) -> list[float]:
    """The alphas of a parsed alphas file, validated; ``source`` names the file in errors.

    Accepted: the seed's list of step objects (``ratio_i_alpha`` with optional ``step``,
    ``layer_to_merge_into``, ``layer_to_remove``, ``ratio_j``; ``alpha``/``into``/``remove`` also work),
    a plain list of numbers, or ``{"alphas": <either list>, "num_layers": L}``. ``steps`` keeps only the
    first entries (the seed's ``--num_layer``). With ``num_layers`` the count and pairs are checked
    against the model; without it the pairs are checked for being one chain.
    """
    if isinstance(data, dict):
        unknown = set(data) - {"alphas", "num_layers"}
        if "alphas" not in data or unknown:
            raise InputError(f"{source}: an object must have an 'alphas' list (and optionally 'num_layers')")
        declared = data.get("num_layers")
        if declared is not None and num_layers is not None and declared != num_layers:
            raise InputError(f"{source}: written for {declared} layers, the model has {num_layers}")
        num_layers = num_layers if num_layers is not None else declared
        data = data["alphas"]
    if not isinstance(data, list):
        raise InputError(f"{source}: expected a JSON list of fusion steps, got {type(data).__name__}")
    if steps is not None:
        if steps < 1 or steps > len(data):
            raise InputError(f"{source}: asked for {steps} steps, the file has {len(data)}")
        data = data[:steps]
    alphas: list[Any] = []
    pairs: list[tuple[int, int] | None] = []
    for i, entry in enumerate(data):
        alpha, pair = _parse_step(entry, f"{source}: step {i}")
        alphas.append(alpha)
        pairs.append(pair)
    if num_layers is None:
        num_layers = _layers_from_pairs(pairs, source) or len(alphas) + 1
    values = validate_alphas(alphas, num_layers, source)
    for i, (pair, expected) in enumerate(zip(pairs, fusion_pairs(num_layers, len(values)), strict=True)):
        if pair is not None and pair != expected:
            raise InputError(
                f"{source}: step {i} fuses {pair[0]}<-{pair[1]}, but on a {num_layers}-layer model "
                f"step {i} must fuse {expected[0]}<-{expected[1]} (always the last two layers)"
            )
    return values


def _parse_step(entry: Any, where: str) -> tuple[Any, tuple[int, int] | None]:
    if not isinstance(entry, dict):
        return entry, None
    unknown = sorted(set(entry) - _STEP_KEYS)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_STEP_KEYS))})")
    alpha = next((entry[k] for k in _ALPHA_KEYS if k in entry), None)
    if alpha is None:
        raise InputError(f"{where}: missing 'ratio_i_alpha'")
    ratio_j = entry.get("ratio_j")
    if (
        ratio_j is not None
        and isinstance(alpha, int | float)
        and (not isinstance(ratio_j, int | float) or abs(float(ratio_j) - (1.0 - float(alpha))) > 1e-4)
    ):
        raise InputError(f"{where}: ratio_j {ratio_j} is not 1 - ratio_i_alpha ({1.0 - float(alpha):.6g})")
    into = next((entry[k] for k in _INTO_KEYS if k in entry), None)
    remove = next((entry[k] for k in _REMOVE_KEYS if k in entry), None)
    if into is None and remove is None:
        return alpha, None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (into, remove)):
        raise InputError(f"{where}: layer_to_merge_into and layer_to_remove must both be integers")
    assert isinstance(into, int) and isinstance(remove, int)  # checked just above
    return alpha, (into, remove)


def _layers_from_pairs(pairs: list[tuple[int, int] | None], source: str) -> int | None:
    """The layer count implied by the first step's pair (``remove + 1``), if any pair is given."""
    for i, pair in enumerate(pairs):
        if pair is not None:
            return pair[1] + 1 + i
    return None


def load_alphas(path: str | Path, num_layers: int | None = None, steps: int | None = None) -> list[float]:
    """Read and validate an alphas file (see ``parse_alphas``)."""
    path = Path(path)
    try:
        data = json.loads(read_text(path, "alphas file"))
    except json.JSONDecodeError as exc:
        raise InputError(f"alphas file {path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    return parse_alphas(data, f"alphas file {path}", num_layers, steps)


def alphas_records(num_layers: int, alphas: Sequence[float]) -> list[dict[str, Any]]:
    """The seed's ``fusion_alphas.json`` records (steps numbered from 0) for ``alphas``."""
    return [
        {
            "step": i,
            "layer_to_merge_into": step.into,
            "layer_to_remove": step.remove,
            "ratio_i_alpha": step.alpha,
            "ratio_j": 1.0 - step.alpha,
        }
        for i, step in enumerate(fusion_steps(num_layers, alphas))
    ]
