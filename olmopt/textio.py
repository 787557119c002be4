"""Reading the user's text files (study YAML, merge configs, DFS recipes, reports, index files).

One reader, so every text file olmopt reads fails the same way: a missing file, a directory, bytes
that are not UTF-8 or an unreadable path are one-line ``InputError``s naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a mapping naming a key twice is an error (PyYAML keeps the last
    value and silently drops the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicated key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicated keys (raises ``yaml.YAMLError`` like it)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
