"""``olmopt merge dfs CONFIG.yml --out DIR``: execute a data-flow-space recipe and export it.

Accepts the seed's YAML layout (``model_paths``, ``layer_mask``, ``scaling_factors``, ...; python
OrderedDict/tuple tags read by a SafeLoader subclass). Everything that can be checked from the
recipe and the model configs is checked before any weight is loaded or any file is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from olmopt.commands._merge_group import merge_subparsers
from olmopt.errors import InputError, ModelError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = merge_subparsers(subparsers).add_parser(
        "dfs",
        help="stack layers of several models along a data-flow path and export a standard model",
        description=(
            "Execute a data-flow-space (DFS) recipe: layers selected by layer_mask run as a path of hops, "
            "with a scale (and optional affine map) on the branch entering each hop. The path is folded "
            "into a plain Llama/Qwen2/Mistral model directory (num_hidden_layers = hops)."
        ),
    )
    parser.add_argument("config", type=Path, help="DFS recipe (YAML; the seed's layout is accepted)")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.set_defaults(func=run)


def _architecture_name(config: Any, classification: bool) -> str:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    names = (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
        if classification
        else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    return names.get(
        getattr(config, "model_type", ""), f"unknown model_type {getattr(config, 'model_type', None)!r}"
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``olmopt merge dfs``: quiet transformers logging, then merge."""
    import transformers

    from olmopt.runtime import configure_threads

    configure_threads()
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    if args.quiet or args.json:
        transformers.logging.disable_progress_bar()
    try:
        return _merge(args)
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def _merge(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from olmopt.methods.dfs.folded_model import check_exportable, export_path
    from olmopt.methods.dfs.seed_recipe import load_dfs_recipe
    from olmopt.outdir import check_output
    from olmopt.pool.checkpoint import Checkpoint
    from olmopt.pool.resolve import resolve_model

    recipe = load_dfs_recipe(args.config)
    base_dir = args.config.resolve().parent
    directories = [resolve_model(ref, base_dir=base_dir, revision=rev) for ref, rev in recipe.models]
    check_output(args.out, [args.config, *directories], args.force)
    configs = []
    for (ref, _), directory in zip(recipe.models, directories, strict=True):
        try:
            configs.append(AutoConfig.from_pretrained(directory))
        except (OSError, ValueError, KeyError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"model {ref}: cannot read config.json: {reason}") from None
    try:
        path = recipe.to_path(
            [int(c.num_hidden_layers) for c in configs], int(configs[recipe.input_model].hidden_size)
        )
        check_exportable(configs, path, _architecture_name(configs[path.output_index], recipe.classification))
    except InputError as exc:
        raise InputError(f"{args.config}: {exc}") from None

    auto = AutoModelForSequenceClassification if recipe.classification else AutoModelForCausalLM
    for (ref, _), directory, config in zip(recipe.models, directories, configs, strict=True):
        Checkpoint(directory, ref).check_complete(config, auto)  # from_pretrained would fill gaps at random
    models = []
    for (ref, _), directory in zip(recipe.models, directories, strict=True):
        try:
            models.append(auto.from_pretrained(directory, dtype="auto").eval())
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelError(f"model {ref}: cannot load weights: {reason}") from None
    with torch.no_grad():
        export_path(
            models,
            path,
            args.out,
            force=args.force,
            side_files_from=directories[path.input_index],
            sources=[ref for ref, _ in recipe.models],
        )
    summary = {
        "out": str(args.out),
        "architecture": type(models[path.output_index]).__name__,
        "num_hidden_layers": path.num_hops,
        "hops": [list(h) for h in path.hops],
        "scales": list(path.scales),
        "input_model": recipe.models[path.input_index][0],
        "output_model": recipe.models[path.output_index][0],
    }
    if args.json:
        print(json.dumps(summary))
    elif not args.quiet:
        print(
            f"wrote {summary['architecture']} with {path.num_hops} layers ({path.num_hops} hops) to "
            f"{args.out}",
            file=sys.stdout,
        )
    return 0
