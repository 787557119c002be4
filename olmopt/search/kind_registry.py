"""The decision-kind registry: stage kind string -> the registered :class:`DecisionKind`.

Import ``olmopt.search.kinds`` (not this module alone) to see the built-in kinds; a plug-in module
calls :func:`register_kind` on import. Torch-free and Optuna-free.
"""

from __future__ import annotations

from olmopt.errors import InputError
from olmopt.search.kind import DecisionKind

_KINDS: dict[str, DecisionKind] = {}


def register_kind(kind: DecisionKind) -> DecisionKind:
    """Register ``kind`` under each of its ``stage_kinds`` (a name taken by another kind is an error)."""
    if not kind.stage_kinds:
        raise ValueError(f"{kind!r} declares no stage_kinds")
    for name in kind.stage_kinds:
        taken = _KINDS.get(name)
        if taken is not None and taken is not kind and type(taken) is not type(kind):
            raise ValueError(f"stage kind {name!r} is already registered by {taken!r}")
    for name in kind.stage_kinds:
        _KINDS[name] = kind
    return kind


def unregister_kind(kind: DecisionKind) -> None:
    """Remove ``kind`` (tests register toy kinds and take them away again)."""
    for name in kind.stage_kinds:
        if _KINDS.get(name) is kind:
            del _KINDS[name]


def get_kind(name: str) -> DecisionKind:
    """The kind that plans and builds stages of kind ``name``."""
    try:
        return _KINDS[name]
    except KeyError:
        known = ", ".join(sorted(_KINDS))
        raise InputError(
            f"stage kind {name!r} is not registered (known: {known}); import the module that registers it"
        ) from None


def registered() -> list[DecisionKind]:
    """Every registered kind once, in plan order (``order``, then registration order)."""
    unique = list({id(k): k for k in _KINDS.values()}.values())
    return sorted(unique, key=lambda k: k.order)
