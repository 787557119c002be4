"""Reading the user's text files (study YAML, merge configs, DFS recipes, reports, index files).

One reader, so every text file olmopt reads fails the same way: a missing file, a directory, bytes
that are not UTF-8 or an unreadable path are one-line ``InputError``s naming the file.
"""

from __future__ import annotations

from pathlib import Path

from olmopt.errors import InputError


def read_text(path: str | Path, what: str = "", error: type[InputError] = InputError) -> str:
    """The UTF-8 text of ``path``; ``what`` names the file's role in messages ("report", "config")."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{name}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x})") from None
    except FileNotFoundError:
        raise error(f"{name} does not exist") from None
    except IsADirectoryError:
        raise error(f"{name}: is a directory, not a file") from None
    except OSError as exc:
        raise error(f"{name}: cannot read ({exc.strerror or type(exc).__name__})") from None
