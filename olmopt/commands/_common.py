"""Helpers shared by CLI subcommands: storage flags, JSON output, SIGTERM handling."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from olmopt.defaults import DEFAULT_STORAGE


def add_storage_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        help=f"Optuna storage URL (default: $OLMOPT_STORAGE, the study file's, or {DEFAULT_STORAGE})",
    )


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C so running trials are failed and the run can resume."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
