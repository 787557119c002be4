"""Command-line flags generated from the merge-method registry, and the shared ``olmopt merge`` runner.

Every declared parameter becomes one flag (``base_droprate`` -> ``--base-droprate``): numbers take one
value, per-variant parameters one value or one per variant (``--weights 0.7 0.3``), booleans
``--name``/``--no-name``. A flag shared by several methods is declared once; using it with a method
that lacks the parameter is bad input naming the flag and the method.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from olmopt.commands._common import show_bars
from olmopt.errors import InputError
from olmopt.methods.delta import MethodParams, MethodSpec, make_params
from olmopt.methods.registry import Param


def dest(param: Param) -> str:
    return f"param_{param.name}"


def add_param_flags(parser: argparse.ArgumentParser, specs: Iterable[MethodSpec]) -> dict[str, Param]:
    """Add one flag per distinct parameter of ``specs``; returns parameter name -> declaration."""
    specs = list(specs)
    owners: dict[str, list[str]] = {}
    defaults: dict[str, set[str]] = {}
    params: dict[str, Param] = {}
    for spec in specs:
        for param in spec.params:
            owners.setdefault(param.name, []).append(spec.name)
            defaults.setdefault(param.name, set()).add(_shown(param.default))
            if param.name not in params or (param.per_variant and not params[param.name].per_variant):
                params[param.name] = param  # a per-variant declaration makes the flag take several values
    for name, param in params.items():
        label = "/".join(owners[name]) if len(owners[name]) < len(specs) else ""
        default = defaults[name].pop() if len(defaults[name]) == 1 else "per method"
        text = f"{label + ': ' if label else ''}{param.help or name} (default {default})"
        if param.kind == "bool":
            parser.add_argument(
                param.flag, dest=dest(param), action=argparse.BooleanOptionalAction, help=text
            )
        elif param.per_variant:
            parser.add_argument(
                param.flag,
                dest=dest(param),
                type=float,
                nargs="+",
                metavar="X",
                help=text + "; one or one per variant",
            )
        else:
            parser.add_argument(
                param.flag,
                dest=dest(param),
                type=int if param.kind == "int" else float,
                metavar="X",
                help=text,
            )
    return params


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def flag_values(args: argparse.Namespace, spec: MethodSpec, flags: dict[str, Param]) -> dict[str, Any]:
    """Raw parameter values given as flags; a flag the method does not declare is InputError."""
    declared = {p.name for p in spec.params}
    out: dict[str, Any] = {}
    for name, param in flags.items():
        value = getattr(args, dest(param), None)
        if value is None:
            continue
        if name not in declared:
            raise InputError(f"{param.flag} does not apply to method {spec.name}")
        out[name] = value[0] if isinstance(value, list) and len(value) == 1 else value
    return out


def add_common_arguments(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        parser.add_argument("base", nargs="?", metavar="BASE", help="base model directory")
        parser.add_argument("variants", nargs="*", metavar="VARIANT", help="variant model directories")
    parser.add_argument("--out", type=Path, help="output model directory (must not exist unless --force)")
    parser.add_argument("--threads", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")


def run_merge(
    args: argparse.Namespace,
    base: Path,
    variants: Sequence[Path],
    out: Path,
    method: str,
    params: MethodParams,
    seed: int,
) -> int:
    """Stream the merge and print the summary (shared by every ``olmopt merge <method>``)."""
    from olmopt.methods.delta.stream import merge_directories
    from olmopt.outdir import check_output

    config = getattr(args, "config", None)
    check_output(out, [base, *variants, *([config] if config else [])], args.force)
    summary = merge_directories(
        base,
        variants,
        out,
        method,
        params,
        seed=seed,
        force=args.force,
        threads=max(1, args.threads),
        progress=show_bars(args.quiet or args.json),
    )
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(
            f"merged {summary['tensors']} tensors ({summary['method']}) into {summary['out']} "
            f"in {summary['seconds']:.1f} s",
            file=sys.stdout,
        )
    return 0


def register_method_command(group: argparse._SubParsersAction, spec: MethodSpec) -> None:
    """``olmopt merge <spec.name> BASE VARIANT... --out DIR`` with the method's own flags."""
    parser = group.add_parser(
        spec.name,
        help=spec.summary,
        description=(
            f"{spec.summary}. Variants are listed highest priority first. Writes a Hugging Face model "
            "directory atomically."
        ),
    )
    add_common_arguments(parser)
    if spec.stochastic:
        parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    flags = add_param_flags(parser, [spec])

    def run(args: argparse.Namespace) -> int:
        if not args.base:
            raise InputError(f"merge {spec.name}: give BASE")
        if not args.variants:
            raise InputError(f"merge {spec.name}: give at least one VARIANT")
        if args.out is None:
            raise InputError(f"merge {spec.name}: give --out DIR")
        params = make_params(spec.name, flag_values(args, spec, flags))
        seed = getattr(args, "seed", 0)
        return run_merge(
            args, Path(args.base), [Path(v) for v in args.variants], args.out, spec.name, params, seed
        )

    parser.set_defaults(func=run)
