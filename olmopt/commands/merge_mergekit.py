"""``olmopt merge mergekit CONFIG.yml --out DIR``: execute a mergekit configuration with olmopt's methods.

The YAML is turned into a Recipe (``olmopt.mergekit``) and written like an export: streamed, atomically,
with ``merge_report.json`` (so ``olmopt rebuild`` replays it). Every check (keys, methods, parameters,
models, layer ranges) runs before anything is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from olmopt.commands._common import show_bars
from olmopt.commands._merge_group import merge_subparsers
from olmopt.errors import InputError, ModelError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = merge_subparsers(subparsers).add_parser(
        "mergekit",
        help="execute a mergekit YAML (models/slices, per-layer gradient lists) with olmopt's methods",
        description=(
            "Execute a mergekit configuration with olmopt's merge methods: merge_method, base_model, models "
            "or slices, parameters (scalars and gradient lists at top, slice and model level). Model paths "
            "are relative to the current directory, as in mergekit. See docs/methods.md."
        ),
    )
    parser.add_argument("config", type=Path, help="mergekit configuration (YAML)")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print {out, recipe} as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, nothing printed on success")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from olmopt import __version__
    from olmopt.export import write_model_dir
    from olmopt.mergekit import load_mergekit
    from olmopt.pool.model_pool import ModelPool
    from olmopt.pool.resolve import resolve_model
    from olmopt.runtime import configure_threads

    configure_threads()
    if args.out.exists() and not args.force:
        raise InputError(f"output {args.out} already exists (pass --force to replace it)")
    config = load_mergekit(args.config)
    for ref, key in zip(config.models, config.keys, strict=True):
        try:
            resolve_model(ref)
        except (InputError, ModelError) as exc:
            raise type(exc)(f"{args.config}: {key}: {exc}") from None
    pool = ModelPool(list(config.models))
    pool.check_homology()
    try:
        recipe = config.build(pool.adapter)
    except InputError as exc:
        raise InputError(f"{args.config}: {exc}") from None
    checkpoint = pool[recipe.base].checkpoint
    base_dtype = checkpoint.dtype_name(checkpoint.keys()[0])
    if config.out_dtype is not None and config.out_dtype != base_dtype:
        raise InputError(
            f"{args.config}: out_dtype: olmopt writes the base model's dtype ({base_dtype}), got "
            f"{config.out_dtype}"
        )
    recipe.validate_against(
        pool.names, pool.adapter.num_layers, pool.adapter.all_units(pool[recipe.base].checkpoint.keys())
    )
    report = {
        "recipe": recipe.to_dict(),
        "mergekit_config": yaml.safe_load(args.config.read_text()),
        "olmopt_version": __version__,
    }
    card = (
        f"# olmopt merge\n\nExecuted by olmopt {__version__} from the mergekit configuration "
        f"`{args.config.name}`.\n"
    )
    write_model_dir(
        pool, recipe, args.out, report, card, force=args.force, progress=show_bars(args.quiet or args.json)
    )
    if args.json:
        print(json.dumps({"out": str(args.out), "recipe": recipe.to_dict()}))
    elif not args.quiet:
        print(
            f"wrote {args.out} ({recipe.param_merge.method if recipe.param_merge else 'passthrough'})",
            file=sys.stdout,
        )
    return 0
