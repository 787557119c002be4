"""``olmopt merge <method>``: one subcommand per registered per-tensor merge method, flags generated.

``merge circuit`` keeps its own command (``merge_circuit.py``: the original YAML and ``--method``);
every other method in ``olmopt.methods.registry`` gets ``olmopt merge NAME BASE VARIANT... --out DIR``.
"""

from __future__ import annotations

import argparse

from olmopt.commands._merge_group import merge_subparsers
from olmopt.commands._method_cli import register_method_command
from olmopt.methods.delta import registered


def register(subparsers: argparse._SubParsersAction) -> None:
    group = merge_subparsers(subparsers)
    for name, spec in sorted(registered().items()):
        if name not in group.choices:  # ``circuit`` has its own command
            register_method_command(group, spec)
