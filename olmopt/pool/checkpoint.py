"""Lazy, read-only access to a model directory's safetensors weights (mmap), pickle refused.

``Checkpoint(dir)`` indexes tensor names across single-file or sharded safetensors checkpoints and
reads one tensor at a time with ``safe_open`` (memory-mapped, nothing else loaded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from olmopt.errors import ModelError
from olmopt.textio import read_text

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class Checkpoint:
    """The safetensors files of one model directory, indexed by tensor name."""

    def __init__(self, directory: str | Path, name: str | None = None) -> None:
        self.directory = Path(directory)
        self.name = name or str(directory)
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._index()

    def _index(self) -> None:
        if not self.directory.is_dir():
            raise ModelError(f"model {self.name}: directory {self.directory} does not exist")
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(read_text(index, f"model {self.name}:", ModelError))["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) for v in weight_map.values()
                ):
                    raise ValueError("weight_map must map tensor names to file names")
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"model {self.name}: malformed {index.name}: {exc}") from None
            self._file_of = {k: self.directory / v for k, v in weight_map.items()}
            for shard in sorted(set(self._file_of.values())):
                if not shard.is_file():
                    raise ModelError(
                        f"model {self.name}: {index.name} names shard {shard.name}, which is missing"
                    )
                present = set(self._open(shard).keys())
                for key in sorted(k for k, v in self._file_of.items() if v == shard):
                    if key not in present:
                        raise ModelError(
                            f"model {self.name}: {index.name} puts tensor {key!r} in {shard.name}, which "
                            "lacks it"
                        )
            return
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise ModelError(
                    f"model {self.name}: only pickle weights ({pickles[0]}); olmopt loads safetensors only "
                    "(convert the checkpoint to safetensors; pickle files can run code when loaded)"
                )
            raise ModelError(f"model {self.name}: no *.safetensors weights in {self.directory}")
        for path in files:
            for key in self._open(path).keys():  # noqa: SIM118 - safe_open has no __iter__
                self._file_of[key] = path

    def _open(self, path: Path):
        """A safe_open handle; a truncated or inconsistent file is a one-line ModelError naming it."""
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelError(
                    f"model {self.name}: damaged safetensors file {path.name} ({_first_line(exc)})"
                ) from None
            self._handles[path] = handle
        return handle

    def _handle(self, path: Path):
        return self._open(path)

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor in the stored dtype)."""
        try:
            path = self._file_of[name]
        except KeyError:
            raise ModelError(f"model {self.name}: has no tensor {name!r}") from None
        try:
            return self._handle(path).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelError(
                f"model {self.name}: tensor {name!r} cannot be read from {path.name} ({_first_line(exc)})"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return str(self._handle(self._file_of[name]).get_slice(name).get_dtype())

    def first_nonfinite(self) -> str | None:
        """The first floating-point tensor (in name order) holding NaN or inf, or None.

        One tensor at a time (memory-mapped), so a large checkpoint costs one read, not its size in RAM.
        """
        for name in sorted(self._file_of):
            tensor = self.get(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
        return None

    def check_complete(
        self, config: Any = None, auto_class: Any = None, trust_remote_code: bool = False
    ) -> None:
        """Every tensor the model's class expects is in the checkpoint with the shape its config gives.

        ``from_pretrained`` would otherwise initialise a missing tensor at random (and a shape that
        disagrees with config.json fails deep inside transformers). ``config``: the model's config
        (read from the directory when None; nothing to compare without a config.json). Tied weights
        may be absent when the config ties them. Architectures whose checkpoints transformers renames
        on load (a conversion mapping) are not compared by name.
        """
        if config is None:
            path = self.directory / "config.json"
            if not path.is_file():
                return
            cacheable = auto_class is None and not trust_remote_code
            expected = (expected_from_table(path) or expected_from_disk(path)) if cacheable else MISS
            if expected is MISS:
                config = load_config(self.name, self.directory, trust_remote_code)
                expected = expected_tensors(config, auto_class, trust_remote_code)
                if cacheable:
                    expected_to_disk(path, expected)
        else:
            expected = expected_tensors(config, auto_class, trust_remote_code)
        if expected is None:
            return
        names, prefix = set(self._file_of), expected.prefix
        for name, shape in expected.shapes.items():
            stored = _stored_name(name, names, prefix)
            if stored is None:
                if name in expected.optional:
                    continue
                raise ModelError(
                    f"model {self.name}: the checkpoint lacks tensor {name!r} (transformers would initialise "
                    "it at random)"
                )
            got = self.shape(stored)
            if got != shape:
                raise ModelError(
                    f"model {self.name}: tensor {stored!r} has shape {list(got)} in its checkpoint but "
                    f"{list(shape)} by config.json"
                )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _stored_name(name: str, names: set[str], prefix: str) -> str | None:
    """The checkpoint's name of the model's tensor ``name`` (with or without the base-model prefix)."""
    if name in names:
        return name
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
        return name[len(prefix) + 1 :]
    if prefix and f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    return None


@dataclass(frozen=True)
class ExpectedTensors:
    shapes: dict[str, tuple[int, ...]]
    optional: frozenset[str]  # tied weights the checkpoint may omit
    prefix: str  # the base model's attribute name ("model")


_EXPECTED: dict[tuple[str, str], ExpectedTensors | None] = {}


def expected_tensors(
    config: Any, auto_class: Any = None, trust_remote_code: bool = False
) -> ExpectedTensors | None:
    """The state dict (names and shapes) a model of ``config`` loads, built on the meta device (no memory).

    None when it cannot be compared by name (transformers renames this architecture's checkpoints).
    """
    from transformers import AutoModelForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    auto_class = auto_class or AutoModelForCausalLM
    key = (auto_class.__name__, config.to_json_string())
    if key in _EXPECTED:
        return _EXPECTED[key]
    result: ExpectedTensors | None = None
    if not get_checkpoint_conversion_mapping(getattr(config, "model_type", "")):
        try:
            with torch.device("meta"):
                model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - an architecture transformers cannot build is reported on load
            log.debug("cannot build %s on the meta device: %s", type(config).__name__, exc)
        else:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
            tied = getattr(model, "_tied_weights_keys", None) or {}
            optional = set(tied) if getattr(text, "tie_word_embeddings", False) else set()
            ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
            shapes = {
                name: tuple(t.shape)
                for name, t in model.state_dict().items()
                if not any(p.search(name) for p in ignore)
            }
            result = ExpectedTensors(
                shapes, frozenset(optional), getattr(model, "base_model_prefix", "") or ""
            )
    _EXPECTED[key] = result
    return result


MISS: Any = object()  # expected_from_disk: nothing stored for this config.json


def expected_from_table(config_path: Path) -> ExpectedTensors | None:
    """``expected_tensors`` of a config.json whose architecture ``pool.architectures`` lists (no
    transformers import), else None."""
    from olmopt.pool.architectures import decoder_state_dict

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = decoder_state_dict(config) if isinstance(config, dict) else None
    if found is None:
        return None
    shapes, tied = found
    return ExpectedTensors(shapes, frozenset({"lm_head.weight"} if tied else ()), "model")


def _expected_file(config_path: Path) -> Path | None:
    """Where the expected tensors of this config.json (bytes and installed transformers) are stored.

    ``OLMOPT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/olmopt`` or ``~/.cache/olmopt``); None when
    transformers is not installed or the file cannot be read.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        digest = hashlib.sha256(config_path.read_bytes())
        digest.update(f"\0transformers {version('transformers')}\0AutoModelForCausalLM".encode())
        root = (
            os.environ.get("OLMOPT_CACHE_DIR")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "olmopt"
        )
    except (OSError, PackageNotFoundError, RuntimeError):  # RuntimeError: no home directory
        return None
    return Path(root) / "expected-tensors" / f"{digest.hexdigest()}.json"


def expected_from_disk(config_path: Path) -> ExpectedTensors | None:
    """The stored ``expected_tensors`` of a config.json, None (not comparable) or ``MISS``.

    Building them imports the architecture's transformers modules (about 3 CPU s for a Llama, most of a
    streaming merge's start-up), so ``check_complete`` keeps them on disk per config.json and
    transformers version.
    """
    file = _expected_file(config_path)
    try:
        data = json.loads(file.read_text()) if file is not None else None
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        return MISS
    if data.get("comparable") is False:
        return None
    try:
        shapes = {str(k): tuple(int(x) for x in v) for k, v in data["shapes"].items()}
        return ExpectedTensors(shapes, frozenset(map(str, data["optional"])), str(data["prefix"]))
    except (KeyError, TypeError, ValueError, AttributeError):
        return MISS


def expected_to_disk(config_path: Path, expected: ExpectedTensors | None) -> None:
    """Store ``expected`` for ``expected_from_disk`` (atomically; a failure only costs the next check)."""
    file = _expected_file(config_path)
    if file is None:
        return
    if expected is None:
        record: dict[str, Any] = {"comparable": False}
    else:
        shapes = {k: list(v) for k, v in expected.shapes.items()}
        record = {"shapes": shapes, "optional": sorted(expected.optional), "prefix": expected.prefix}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, file)
    except OSError as exc:
        log.debug("cannot store expected tensors in %s: %s", file, exc)


def load_config(name: str, path: Path, trust_remote_code: bool = False) -> Any:
    """The model's transformers config; a config.json transformers cannot read is a one-line ModelError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(
            f"model {name}: cannot read config.json in {path}: {str(exc).splitlines()[0]}"
        ) from None
