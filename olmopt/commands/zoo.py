"""``olmopt zoo build``: train the offline model family (base + specialists) on the CPU."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olmopt.commands._common import show_bars
from olmopt.errors import InputError

# Literal copies keep `olmopt --help` free of torch imports; build_zoo validates against the real ones.
SIZES = ("tiny", "small")
ARCHS = ("llama", "qwen2", "mistral")


def register(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="the offline model zoo (synthetic homologous model family)")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    build = zoo_sub.add_parser(
        "build",
        help="train the zoo family into a directory (cached; deterministic)",
        description="Train a base model and its specialists on synthetic skills, check the acceptance "
        "criteria and write DIR/zoo.json. Threads: OLMOPT_THREADS (default 1).",
    )
    build.add_argument("--out", required=True, type=Path, metavar="DIR", help="zoo directory to write")
    # choices are validated by build_zoo so that a bad value gives one clear line and exit 2
    build.add_argument("--size", default="tiny", help=f"model size: {' | '.join(SIZES)} (default tiny)")
    build.add_argument("--arch", default="llama", help=f"architecture: {' | '.join(ARCHS)} (default llama)")
    build.add_argument(
        "--seed", type=int, default=None, help="training seed (default: the pinned seed that passes)"
    )
    for role, example in (("lower", "2,3"), ("upper", "4,5")):
        build.add_argument(
            f"--{role}-layers",
            metavar="I,J",
            help=f"layer indices the {role}-layer specialist trains, e.g. {example} (a layout variant: no "
            "seed is pinned for it; default: the family's own, docs/zoo.md)",
        )
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument("--force", action="store_true", help="rebuild even if DIR holds this zoo; replace DIR")
    build.add_argument(
        "--refresh",
        action="store_true",
        help="rebuild DIR when it holds a zoo built with other arguments or by another olmopt zoo version "
        "(a directory that is not a zoo is still refused)",
    )
    build.add_argument(
        "--no-check", action="store_true", help="keep a family that fails the acceptance criteria"
    )
    build.set_defaults(func=run_build)
    zoo.set_defaults(func=lambda args: (zoo.print_help(), 2)[1])


def run_build(args: argparse.Namespace) -> int:
    from olmopt.kernels import request_portable_kernels

    request_portable_kernels()  # before torch computes anything: no child process needed
    from olmopt.zoo import build_zoo, cached_manifest

    layout = {
        "lower": layer_indices(args.lower_layers, "lower"),
        "upper": layer_indices(args.upper_layers, "upper"),
    }
    cached = (
        not args.force and cached_manifest(args.out, args.size, args.arch, args.seed, **layout) is not None
    )
    if cached:
        print(
            f"zoo {args.out} is already built with these arguments; nothing to do (--force rebuilds)",
            file=sys.stderr,
        )
    manifest = build_zoo(
        args.out,
        args.size,
        args.arch,
        args.seed,
        progress=show_bars(args.quiet),
        check=not args.no_check,
        force=args.force,
        refresh=args.refresh,
        **layout,
    )
    status = "passed" if manifest["acceptance"]["passed"] else "FAILED (kept: --no-check)"
    print(
        f"zoo {args.out}: {args.size}/{args.arch} seed {manifest['seed']}, {len(manifest['models'])} models, "
        f"acceptance {status}, " + ("reused" if cached else f"built in {manifest['build_seconds']:.0f} s")
    )
    return 0


def layer_indices(text: str | None, role: str) -> tuple[int, ...] | None:
    """``--lower-layers 2,3`` as (2, 3); None when the flag is not given. InputError for anything else."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(
            f"--{role}-layers: expected layer indices separated by commas, got {text!r}"
        ) from None
