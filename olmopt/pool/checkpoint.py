"""Lazy, read-only access to a model directory's safetensors weights (mmap), pickle refused.

``Checkpoint(dir)`` indexes tensor names across single-file or sharded safetensors checkpoints and
reads one tensor at a time with ``safe_open`` (memory-mapped, nothing else loaded).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from olmopt.errors import ModelError

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
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise ModelError(f"model {self.name}: malformed {index.name}: {exc}") from None
            self._file_of = {k: self.directory / v for k, v in weight_map.items()}
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
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    self._file_of[key] = path

    def _handle(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
        return handle

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
        return self._handle(path).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._file_of[name]).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return str(self._handle(self._file_of[name]).get_slice(name).get_dtype())
