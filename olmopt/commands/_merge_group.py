"""The shared ``olmopt merge`` command group (``merge circuit``, ``merge fuse``, ``merge dfs``...).

Each merge command calls ``merge_subparsers(subparsers)`` from its ``register`` and adds its own parser
to the returned group; the group is created once and cached on the top-level subparsers object.
"""

from __future__ import annotations

import argparse

_CACHE_ATTR = "_olmopt_merge_group"


def merge_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Return the ``merge`` group's subparsers, creating the ``merge`` command on first use."""
    cached = getattr(subparsers, _CACHE_ATTR, None)
    if cached is not None:
        return cached
    parser = subparsers.add_parser(
        "merge",
        help="merge model directories into a new one (circuit, fuse, dfs, ...)",
        description="Merge local model directories into a new Hugging Face model directory.",
    )
    group = parser.add_subparsers(dest="merge_method", metavar="METHOD")
    parser.set_defaults(func=lambda _args: _print_help(parser))
    setattr(subparsers, _CACHE_ATTR, group)
    return group


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
