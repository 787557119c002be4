"""The built-in decision kinds, one module each, registered in ``olmopt.search.kind_registry``.

Import this package (not the registry alone) to see every built-in kind: it imports each kind
module, in plan order, and re-exports the registry's lookups. Importing it loads no torch.
"""

from __future__ import annotations

from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace
from olmopt.search.kind_registry import get_kind, register_kind, registered, unregister_kind
from olmopt.search.kinds import (  # noqa: F401 - each import registers its kinds
    base_lookahead,
    dfs,
    es,
    es_tune,
    fusion,
    joint,
    merge,
    merge_challenge,
    polish,
    swap,
)

__all__ = [
    "DecisionKind",
    "SpaceEnv",
    "Stage",
    "StageSpace",
    "get_kind",
    "register_kind",
    "registered",
    "unregister_kind",
]
