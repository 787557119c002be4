"""``olmopt merge circuit``: Circuit-Merge! (or any registered per-tensor method via ``--method``).

Accepts the original Circuit-Merge YAML (``base_model``, ``variant_models: [{model: path}]``,
``output_dir``, ``parameters: {...}``); command-line flags override it. Variants are listed highest
priority first. The flags are generated from the merge-method registry (``olmopt.methods.registry``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from olmopt.commands._merge_group import merge_subparsers
from olmopt.commands._method_cli import (
    add_common_arguments,
    add_param_flags,
    flag_values,
    method_params,
    run_merge,
)
from olmopt.errors import InputError
from olmopt.methods.delta import get_method, registered
from olmopt.methods.registry import per_variant_names

_FLAGS: dict[str, Any] = {}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = merge_subparsers(subparsers).add_parser(
        "circuit",
        help="Circuit-Merge! (or --method: any per-tensor method) of variants onto a base model",
        description=(
            "Merge the task vectors (variant - base) of VARIANT models onto BASE. Variants are listed "
            "highest priority first. Writes a Hugging Face model directory atomically."
        ),
    )
    add_common_arguments(parser)
    parser.add_argument("--config", type=Path, help="Circuit-Merge YAML (base_model, variant_models, ...)")
    parser.add_argument(
        "--method",
        metavar="METHOD",
        help=f"merge method (default: circuit; one of {', '.join(sorted(registered()))})",
    )
    parser.add_argument("--skip-rescaling", action="store_true", help="same as --no-rescale")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    _FLAGS.update(add_param_flags(parser, registered().values()))
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
    allowed = per_variant_names(registered().values())
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
            if key not in allowed:
                raise InputError(
                    f"config {path}: variant_models[{position}].parameters.{key} is not a per-variant "
                    f"parameter (one of {', '.join(sorted(allowed))})"
                )
            per_variant.setdefault("weights" if key == "weight" else key, [None] * len(entries))[position] = (
                value
            )
    return paths, per_variant


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Combine YAML and flags into base, variants, out, method, params and seed."""
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
    given = config.get("parameters") or {}
    if not isinstance(given, dict):
        raise InputError(f"config {args.config}: parameters must be a mapping")
    raw_params = dict(given)
    method = args.method or config.get("merge_method") or raw_params.pop("merge_method", None) or "circuit"
    raw_params.pop("merge_method", None)
    spec = get_method(str(method))
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
    raw_params.update(flag_values(args, spec, _FLAGS))
    if args.skip_rescaling:
        if not any(p.name == "rescale" for p in spec.params):
            raise InputError(f"--skip-rescaling does not apply to method {spec.name}")
        raw_params["rescale"] = False
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    params, layer_params = method_params(spec, raw_params, str(base), len(variants))
    return {
        "base": Path(str(base)),
        "variants": [Path(v) for v in variants],
        "out": Path(str(out)),
        "method": spec.name,
        "params": params,
        "layer_params": layer_params,
        "seed": seed,
    }


def run(args: argparse.Namespace) -> int:
    plan = resolve(args)
    return run_merge(
        args, plan["base"], plan["variants"], plan["out"], plan["method"], plan["params"], plan["seed"],
        plan["layer_params"],
    )  # fmt: skip
