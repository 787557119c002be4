"""The ``olmopt`` command line. Subcommands live in ``olmopt.commands.*``.

Each module in ``olmopt/commands`` exposes ``register(subparsers) -> None``; it adds its parser(s)
and sets ``func`` (``(args) -> int``) with ``parser.set_defaults``. This module only dispatches and
turns errors into one line and an exit code (0 ok, 1 failure, 2 bad input, 3 stopped early,
130 interrupted).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

from olmopt import __version__
from olmopt.errors import OlmoptError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="olmopt",
        description="Find better merged language models by black-box optimization over merge recipes.",
        epilog="exit status: 0 ok, 1 failure, 2 bad input, 3 stopped early (resumable), 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"olmopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import olmopt.commands as commands_pkg

    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"olmopt.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        code = int(func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except OlmoptError as exc:
        print(f"olmopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("olmopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `olmopt study list | head`: the reader left; say nothing more
        _discard_stdout()
        return 141
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"olmopt: error: no space left on the device writing {exc.filename or 'the output'}",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:
        if not type(exc).__module__.startswith("sqlalchemy"):
            raise
        # the storage server went away or refused a statement mid-run: one line, not the driver's pages
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        print(
            f"olmopt: error: storage failure ({type(exc).__name__}): {reason[0] if reason else ''}; rerun to "
            "resume",
            file=sys.stderr,
        )
        return 1


def _discard_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor behind stdout
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
