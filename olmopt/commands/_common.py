"""Helpers shared by CLI subcommands: storage flags, progress bars, JSON output, SIGTERM handling."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from olmopt.defaults import DEFAULT_STORAGE


def add_storage_flag(parser: argparse.ArgumentParser, study_file: bool = False) -> None:
    """--storage URL; only ``study create`` reads a study file, so only it names the file's ``storage:``."""
    from_file = "the study file's `storage:`, " if study_file else ""
    default = DEFAULT_STORAGE.removeprefix("sqlite:///")
    parser.add_argument(
        "--storage",
        metavar="URL",
        help=(
            f"Optuna storage URL (default: $OLMOPT_STORAGE, {from_file}else SQLite {default} in the current "
            "directory or the nearest parent directory that has one)"
        ),
    )


class _ExamplesFormatter(argparse.HelpFormatter):
    """Wraps descriptions as usual; keeps an ``examples:`` epilog's lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def examples(*lines: str) -> dict[str, Any]:
    """``add_parser`` keywords for an ``examples:`` section at the end of ``--help``."""
    return {
        "epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
        "formatter_class": _ExamplesFormatter,
    }


def show_bars(quiet: bool) -> bool:
    """Progress bars only on a terminal and without --quiet:
    redirected output gets no carriage-return frames."""
    return not quiet and sys.stderr.isatty()


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def sigterm_as_interrupt() -> None:
    """Treat SIGTERM like Ctrl-C so running trials are failed and the run can resume."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
