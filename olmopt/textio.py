"""Reading the user's text files (study YAML, merge configs, DFS recipes, reports, index files).

One reader, so every text file olmopt reads fails the same way: a missing file, a directory, bytes
that are not UTF-8 or an unreadable path are one-line ``InputError``s naming the file.
"""

from __future__ import annotations

from pathlib import Path

from olmopt.errors import InputError


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; ``what`` names the file's role in messages ("study file", "report")."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})") from None
    except FileNotFoundError:
        raise InputError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: is a directory, not a file") from None
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read ({exc.strerror or type(exc).__name__})") from None
