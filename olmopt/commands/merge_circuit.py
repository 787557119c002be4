"""``olmopt merge circuit``: Circuit-Merge!, DELLA or task arithmetic of local model directories.

Accepts the original Circuit-Merge YAML (``base_model``, ``variant_models: [{model: path}]``,
``output_dir``, ``parameters: {...}``); command-line flags override it. Variants are listed highest
priority first.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from olmopt.commands._merge_group import merge_subparsers
from olmopt.errors import InputError

METHODS = ("circuit", "della", "task_arithmetic")  # olmopt.ops.delta_merge.METHODS, named here to keep --help light

METHOD_ALIASES = {"circuit_merge": "circuit", "circuit-merge": "circuit", "della_magprune": "della"}
PER_VARIANT_KEYS = ("density", "epsilon", "weight", "weights")
# flag (argparse dest) -> parameter name, and the methods the flag applies to
FLAG_PARAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "temperature": ("temperature", ("circuit",)),
    "base_droprate": ("base_droprate", ("circuit",)),
    "threshold": ("threshold", ("circuit",)),
    "density": ("density", ("della",)),
    "epsilon": ("epsilon", ("circuit", "della")),
    "lambda_": ("lambda", ("della", "task_arithmetic")),
    "weights": ("weights", ("della", "task_arithmetic")),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = merge_subparsers(subparsers).add_parser(
        "circuit",
        help="Circuit-Merge! (or DELLA / task arithmetic) of variants onto a base model",
        description=(
            "Merge the task vectors (variant - base) of VARIANT models onto BASE. Variants are listed "
            "highest priority first. Writes a Hugging Face model directory atomically."
        ),
    )
    parser.add_argument("base", nargs="?", metavar="BASE", help="base model directory")
    parser.add_argument("variants", nargs="*", metavar="VARIANT", help="variant model directories")
    parser.add_argument("--out", type=Path, help="output model directory (must not exist unless --force)")
    parser.add_argument("--config", type=Path, help="Circuit-Merge YAML (base_model, variant_models, ...)")
    parser.add_argument("--method", choices=sorted(METHODS), help="merge method (default: circuit)")
    parser.add_argument("--temperature", type=float, help="circuit: 0 = priority decay, 1 = running mean")
    parser.add_argument("--base-droprate", type=float, help="circuit: drop rate of the top-priority variant")
    parser.add_argument("--threshold", type=float, help="circuit: |delta| below this counts as unchanged")
    parser.add_argument("--skip-rescaling", action="store_true", help="do not rescale survivors by 1/(1-p)")
    parser.add_argument("--density", type=float, help="della: keep fraction")
    parser.add_argument("--epsilon", type=float, help="circuit/della: spread of drop probabilities")
    parser.add_argument("--lambda", dest="lambda_", type=float, help="della/task_arithmetic: delta scale")
    parser.add_argument(
        "--weights", type=float, nargs="+", help="della/task_arithmetic: one weight per variant (or one)"
    )
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="worker threads (default 2)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary line")
    parser.set_defaults(func=run)


def load_config(path: Path) -> dict[str, Any]:
    """Read a Circuit-Merge style YAML into a plain dict (one-line InputError when malformed)."""
    from olmopt.textio import load_yaml, read_text

    text = read_text(path, "config")
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise InputError(f"config {path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"config {path}: expected a mapping at the top level")
    return data


def _variant_entries(config: dict[str, Any], path: Path) -> tuple[list[str], dict[str, list[Any]]]:
    """Variant paths and per-variant parameters (``variant_models: [{model, parameters}]``)."""
    paths: list[str] = []
    per_variant: dict[str, list[Any]] = {}
    entries = config.get("variant_models") or []
    if not isinstance(entries, list):
        raise InputError(f"config {path}: variant_models must be a list")
    for position, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise InputError(f"config {path}: variant_models[{position}] needs a 'model' path")
        paths.append(str(entry["model"]))
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InputError(f"config {path}: variant_models[{position}].parameters must be a mapping")
        for key, value in parameters.items():
            if key not in PER_VARIANT_KEYS:
                raise InputError(
                    f"config {path}: per-variant parameter {key!r} is not one of {PER_VARIANT_KEYS}"
                )
            per_variant.setdefault("weights" if key == "weight" else key, [None] * len(entries))[position] = (
                value
            )
    return paths, per_variant


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Combine YAML and flags into base, variants, out, method, params values and seed."""
    config: dict[str, Any] = {}
    variants: list[str] = []
    per_variant: dict[str, list[Any]] = {}
    if args.config is not None:
        config = load_config(args.config)
        variants, per_variant = _variant_entries(config, args.config)
    base = args.base or config.get("base_model")
    if args.variants:
        variants, per_variant = list(args.variants), {}
    out = args.out or config.get("output_dir")
    if not isinstance(config.get("parameters") or {}, dict):
        raise InputError(f"config {args.config}: parameters must be a mapping (name: value)")
    raw_params = dict(config.get("parameters") or {})
    method = args.method or config.get("merge_method") or raw_params.pop("merge_method", None) or "circuit"
    raw_params.pop("merge_method", None)
    method = METHOD_ALIASES.get(str(method), str(method))
    if method not in METHODS:
        raise InputError(f"unknown merge method {method!r} (choose from {', '.join(sorted(METHODS))})")
    seed = raw_params.pop("seed", 0)
    if args.seed is not None:
        seed = args.seed
    if not base:
        raise InputError("merge circuit: give BASE (or base_model in --config)")
    if not variants:
        raise InputError("merge circuit: give at least one VARIANT (or variant_models in --config)")
    if not out:
        raise InputError("merge circuit: give --out DIR (or output_dir in --config)")
    for key, values in per_variant.items():
        if any(v is None for v in values):
            raise InputError(f"config {args.config}: set {key} for every variant or for none")
        raw_params[key] = values
    for dest, (param, methods) in FLAG_PARAMS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if method not in methods:
            raise InputError(f"--{dest.rstrip('_').replace('_', '-')} does not apply to method {method}")
        raw_params[param] = value[0] if isinstance(value, list) and len(value) == 1 else value
    _check_types(raw_params)
    if args.skip_rescaling:
        if method == "task_arithmetic":
            raise InputError("--skip-rescaling does not apply to method task_arithmetic")
        raw_params["skip_rescaling"] = True
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InputError(f"seed must be an integer, got {seed!r}") from None
    return {
        "base": Path(str(base)),
        "variants": [Path(v) for v in variants],
        "out": Path(str(out)),
        "method": method,
        "params": _make_params(method, raw_params),
        "seed": seed,
    }


NUMERIC_PARAMS = {"temperature", "base_droprate", "threshold", "density", "epsilon", "lambda", "weights"}
BOOLEAN_PARAMS = {"skip_rescaling", "normalize"}


def _check_types(raw: dict[str, Any]) -> None:
    """Numbers (finite, not quoted, not booleans) and booleans where the methods expect them: a loosely
    typed YAML value is one line naming the parameter, not a traceback from the tensor maths."""
    for key, value in raw.items():
        if key in BOOLEAN_PARAMS:
            if not isinstance(value, bool):
                raise InputError(f"{key} must be true or false, got {value!r}")
            continue
        if key not in NUMERIC_PARAMS:
            continue  # unknown names are reported by the method's parameters
        for item in value if isinstance(value, list) and key in PER_VARIANT_KEYS + ("weights",) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise InputError(f"{key} must be a number, got {item!r}")
            if not math.isfinite(item):
                raise InputError(f"{key} must be a finite number, got {item}")


def run(args: argparse.Namespace) -> int:
    plan = resolve(args)
    from olmopt.merge_stream import merge_directories
    from olmopt.outdir import check_output

    check_output(plan["out"], [plan["base"], *plan["variants"], *([args.config] if args.config else [])], args.force)

    summary = merge_directories(
        plan["base"],
        plan["variants"],
        plan["out"],
        plan["method"],
        plan["params"],
        seed=plan["seed"],
        force=args.force,
        threads=max(1, args.threads),
        progress=not (args.quiet or args.json),
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


def _make_params(method: str, raw: dict[str, Any]) -> Any:
    from olmopt.ops.delta_merge import make_params

    return make_params(method, raw)
