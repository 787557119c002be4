"""Command-line flags generated from the merge-method registry, and the shared ``olmopt merge`` runner.

Every declared parameter becomes one flag (``base_droprate`` -> ``--base-droprate``): numbers take one
value, per-variant parameters one value or one per variant (``--weights 0.7 0.3``), booleans
``--name``/``--no-name``. A flag shared by several methods is declared once; using it with a method
that lacks the parameter is bad input naming the flag and the method.

A float value may be a per-layer list, ``A,B,C``: mergekit's gradient (the values spread evenly from the
first layer to the last, linear in between; as many values as layers is one value per layer), e.g.
``--weights 0.2,0.8 0.5`` or ``--density 0.3,0.9``.
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

Number = float | tuple[float, ...]  # a value, or a per-layer gradient


def number_or_gradient(text: str) -> Number:
    """A float flag's value: ``0.5``, or a per-layer gradient ``0.2,0.8``."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        message = f"expected a number or numbers separated by commas, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    return values[0] if len(values) == 1 else values


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
                type=number_or_gradient,
                nargs="+",
                metavar="X",
                help=text + "; one or one per variant, each a number or a per-layer list A,B,...",
            )
        else:
            parser.add_argument(
                param.flag,
                dest=dest(param),
                type=int if param.kind == "int" else number_or_gradient,
                metavar="X",
                help=text if param.kind == "int" else text + "; a number or a per-layer list A,B,...",
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


def split_gradients(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values without per-layer lists, the values that hold one)."""

    def layered(value: Any) -> bool:
        items = value if isinstance(value, list) else [value]
        return any(isinstance(v, tuple) for v in items)

    return {k: v for k, v in raw.items() if not layered(v)}, {k: v for k, v in raw.items() if layered(v)}


def layer_lists(
    spec: MethodSpec, gradients: dict[str, Any], count: int, num_layers: int
) -> dict[str, tuple[Any, ...]]:
    """Per-layer values (``ParamMerge.layer_params`` with group size 1) of the gradient flags: each layer's
    value of a gradient is mergekit's (``olmopt.mergekit.evaluate_setting`` at the layer's position)."""
    from olmopt.mergekit import evaluate_setting, layer_position

    out: dict[str, tuple[Any, ...]] = {}
    for name, value in gradients.items():
        param = spec.param(name)
        items = value if isinstance(value, list) else [value]
        if param.per_variant and len(items) == 1:
            items = items * count
        if param.per_variant and len(items) != count:
            raise InputError(f"{param.flag} has {len(items)} values for {count} variants")
        for item in items:
            for number in item if isinstance(item, tuple) else (item,):
                try:
                    param.check_scalar(spec.name, number)
                except InputError as exc:
                    raise InputError(f"{param.flag}: {exc}") from None

        def at(item: Number, t: float, flag: str = param.flag) -> float:
            return float(evaluate_setting(list(item) if isinstance(item, tuple) else item, t, flag))

        positions = [layer_position(layer, num_layers) for layer in range(num_layers)]
        if param.per_variant:
            out[name] = tuple(tuple(at(item, t) for item in items) for t in positions)
        else:
            out[name] = tuple(at(items[0], t) for t in positions)
    return out


def method_params(
    spec: MethodSpec, raw: dict[str, Any], base: str | Path, count: int
) -> tuple[MethodParams, dict[str, tuple[Any, ...]] | None]:
    """Validated global values and, when a value is a per-layer list, the per-layer values (the layer
    count read from the base model's config.json)."""
    values, gradients = split_gradients(raw)
    params = make_params(spec.name, values)
    if not gradients:
        return params, None
    from olmopt.methods.delta.stream import PreadModel

    layers = int(PreadModel(base).config.get("num_hidden_layers", 0))
    return params, layer_lists(spec, gradients, count, layers)


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
    layer_params: dict[str, tuple[Any, ...]] | None = None,
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
        layer_params=layer_params,
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
        raw = flag_values(args, spec, flags)
        params, layer_params = method_params(spec, raw, args.base, len(args.variants))
        seed = getattr(args, "seed", 0)
        variants = [Path(v) for v in args.variants]
        return run_merge(args, Path(args.base), variants, args.out, spec.name, params, seed, layer_params)

    parser.set_defaults(func=run)
