"""Numbers from environment variables, validated in one place (a bad value is a one-line InputError)."""

from __future__ import annotations

import math
import os

from olmopt.errors import InputError


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """``int(os.environ[name])`` or ``default``; a value that is not an integer >= ``minimum`` is refused."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"environment variable {name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise InputError(f"environment variable {name}={raw!r}: expected an integer >= {minimum}")
    return value


def env_float(name: str, default: float, minimum: float = 0.0) -> float:
    """``float(os.environ[name])`` or ``default``; not a finite number > ``minimum``: refused."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= minimum:
        raise InputError(f"environment variable {name}={raw!r}: expected a finite number > {minimum:g}")
    return value
