"""``olmopt merge fuse MODEL --alphas ALPHAS.json --out DIR``: depth fusion into a shorter model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from olmopt.commands._merge_group import merge_subparsers
from olmopt.errors import ModelError

ALPHAS_FILE_NAME = "fusion_alphas.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = merge_subparsers(subparsers).add_parser(
        "fuse",
        help="fold the last layers into one with fusion alphas (MKA depth fusion)",
        description=(
            "Fold the last decoder layer into the one before it once per alpha "
            "(W_keep <- a*W_keep + (1-a)*W_drop for q,k,v,o,gate,up,down) and write a loadable "
            f"model directory with fewer layers, plus the alphas used as {ALPHAS_FILE_NAME}."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="local Hugging Face model directory (safetensors)")
    parser.add_argument(
        "--alphas",
        required=True,
        metavar="ALPHAS.json",
        help="seed fusion_alphas.json / optimized_alphas.json, a list of numbers, or {'alphas': [...]}",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output model directory")
    parser.add_argument("--steps", type=int, metavar="N", help="use only the first N steps of the file")
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.add_argument("--json", action="store_true", dest="as_json", help="print a JSON summary")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.set_defaults(func=run_fuse)


def run_fuse(args: argparse.Namespace) -> int:
    from olmopt.methods.fusion.alphas_file import alphas_records, load_alphas
    from olmopt.methods.fusion.maths import fusion_coefficients
    from olmopt.methods.fusion.model import fuse_model
    from olmopt.outdir import atomic_output_dir, check_output, copy_side_files
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.runtime import configure_threads

    configure_threads()
    model_dir, out = Path(args.model), Path(args.out)
    config = _load_config(model_dir)
    num_layers = ArchitectureAdapter.from_config(config, str(model_dir)).num_layers
    alphas = load_alphas(args.alphas, num_layers, args.steps)
    check_output(out, [model_dir, args.alphas], args.force)
    model = _load_model(model_dir, quiet=args.quiet or args.as_json)
    fuse_model(model, alphas)
    with atomic_output_dir(out, args.force, inputs=[model_dir, args.alphas]) as tmp:
        copy_side_files(model_dir, tmp)
        model.save_pretrained(tmp)
        records = alphas_records(num_layers, alphas)
        (tmp / ALPHAS_FILE_NAME).write_text(json.dumps(records, indent=2) + "\n")
    summary = {
        "out": str(out),
        "model": str(model_dir),
        "num_layers_before": num_layers,
        "num_layers_after": num_layers - len(alphas),
        "steps": records,
        "coefficients": {
            str(k): {str(i): c for i, c in v.items()}
            for k, v in fusion_coefficients(num_layers, alphas).items()
            if v != {k: 1.0}
        },
    }
    if args.as_json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(f"fused {len(alphas)} steps: {num_layers} -> {num_layers - len(alphas)} layers, wrote {out}")
    return 0


def _load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    from olmopt.pool.checkpoint import Checkpoint

    if not model_dir.is_dir():
        raise ModelError(f"model {model_dir}: directory does not exist")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"model {model_dir}: no config.json (not a Hugging Face model directory)")
    checkpoint = Checkpoint(model_dir)  # refuses missing or pickle-only weights with a clear message
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model {model_dir}: cannot read config.json: {exc}") from None
    checkpoint.check_complete(config)  # from_pretrained would fill a missing tensor with random values
    return config


def _load_model(model_dir: Path, quiet: bool) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"model {model_dir}: cannot load: {str(exc).splitlines()[0]}") from None
