"""Atomic output directories and a streaming, sharded safetensors writer (HF layout).

``atomic_output_dir`` gives every command that writes a model directory the same guarantee: either
the complete directory appears at ``out`` or nothing does. ``ShardedSafetensorsWriter`` streams tensors
into ``model-0000i-of-0000N.safetensors`` shards plus ``model.safetensors.index.json`` so that
``AutoModelForCausalLM.from_pretrained`` loads the result without holding the whole model in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from olmopt.errors import InputError

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

SIDE_FILE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "preprocessor_config.json",
    }
)


def check_output(out: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> None:
    """The one check before a command writes the model directory ``out`` (call it before heavy work).

    ``out`` may be none of the command's ``inputs`` (model directories, config, alphas, report,
    datasets, storage files) nor a directory holding one, with or without ``force``: replacing it
    would destroy the input. Symbolic links, ``..`` and hard-linked or bind-mounted directories are
    seen through. An existing ``out`` is refused unless ``force``; one that is not a directory always.
    """
    out = Path(out)
    for item in inputs:
        if _covers(out, Path(item)):
            raise InputError(
                f"output {out} would overwrite the input {item} (write the result somewhere else)"
            )
    if out.exists() and not force:
        raise InputError(f"output {out} already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory")


def _covers(out: Path, item: Path) -> bool:
    """True when ``item`` is ``out`` or lies inside it."""
    target, source = out.resolve(), item.resolve()
    if source == target or target in source.parents:
        return True
    if not out.exists():
        return False
    for path in (source, *source.parents):
        with contextlib.suppress(OSError):
            if path.exists() and os.path.samefile(path, out):
                return True
    return False


@contextmanager
def atomic_output_dir(
    out: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; move it to ``out`` only when the block succeeds.

    ``check_output`` first: ``out`` may not be or hold one of ``inputs``, and an existing ``out`` is
    refused unless ``force``; with ``force`` the old directory is moved aside and deleted only after
    the new one is in place. On any exception (KeyboardInterrupt included) the temporary directory is
    removed and the exception re-raised, so no partial output is left behind.
    """
    out = Path(out)
    check_output(out, inputs, force)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(parent, out.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise InputError(f"output {out}: cannot create a directory in {parent}: {exc.strerror}") from None
    try:
        tmp.chmod(0o777 & ~_current_umask())  # mkdtemp makes it 0700; give it a normal directory's mode
        yield tmp
        _move_into_place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(parent: Path, name: str) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` left next to ``NAME`` by a killed olmopt process."""
    for path in [*parent.glob(f".{name}.tmp-*"), *parent.glob(f".{name}.old-*")]:
        pid = path.name.rsplit(".", 1)[-1].split("-")[1] if path.name.count("-") >= 2 else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    if not force:
        raise InputError(f"output {out} appeared while writing (pass --force to replace it)")
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    aside.rmdir()
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _spec_nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _safetensors_dtype(name: str, dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_SAFETENSORS[dtype]
    except KeyError:
        raise InputError(f"tensor {name!r}: dtype {dtype} cannot be written to safetensors") from None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    # numpy arrays are buffers; numpy's stubs do not say so to memoryview
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]


@dataclass
class _Shard:
    """One output file: its tensors (in file order) with byte offsets after the header."""

    specs: list[TensorSpec] = field(default_factory=list)
    nbytes: int = 0

    def header(self) -> tuple[bytes, dict[str, int]]:
        """The safetensors header (8-byte length + JSON padded to 8) and each tensor's file offset."""
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self.specs:
            size = _spec_nbytes(dtype, shape)
            entries[name] = {
                "dtype": _safetensors_dtype(name, dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        start = 8 + len(text)
        offsets, position = {}, start
        for name, dtype, shape in self.specs:
            offsets[name] = position
            position += _spec_nbytes(dtype, shape)
        return struct.pack("<Q", len(text)) + text, offsets


class ShardedSafetensorsWriter:
    """Write tensors as HF-style safetensors shards of at most ``max_shard_bytes`` each.

    Without ``plan``, ``add`` buffers tensors until the current shard is full, then writes it (a
    temporary ``part-*.safetensors``); ``close`` names the shards ``model-0000i-of-0000N.safetensors``
    (``model.safetensors`` when there is one) and, for several, writes ``model.safetensors.index.json``.

    With ``plan`` (every tensor's name, dtype and shape, known up front) the shard files and headers
    are laid out at construction and ``add`` writes each tensor straight to its offset (``os.pwrite``),
    in any order and from any thread: memory stays at one tensor. ``close`` checks every planned tensor
    arrived. A tensor larger than ``max_shard_bytes`` gets a shard of its own.
    """

    def __init__(
        self,
        directory: str | Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        plan: Sequence[TensorSpec] | None = None,
    ) -> None:
        if max_shard_bytes <= 0:
            raise InputError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.total_size = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._final: list[Path] = []
        self._planned: dict[str, tuple[int, int, TensorSpec]] | None = None  # name -> (fd, offset, spec)
        self._plan_files: list[tuple[Path, list[str], int]] = []
        if plan is not None:
            self._open_plan(plan)

    def _open_plan(self, plan: Sequence[TensorSpec]) -> None:
        shards = [_Shard()]
        for name, dtype, shape in plan:
            _safetensors_dtype(name, dtype)
            size = _spec_nbytes(dtype, shape)
            if shards[-1].specs and shards[-1].nbytes + size > self.max_shard_bytes:
                shards.append(_Shard())
            shards[-1].specs.append((name, dtype, tuple(shape)))
            shards[-1].nbytes += size
        self._planned = {}
        for number, shard in enumerate(shards, start=1):
            path = self.directory / _shard_name(number, len(shards))
            header, offsets = shard.header()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + shard.nbytes)
            self._plan_files.append((path, [spec[0] for spec in shard.specs], fd))
            for spec in shard.specs:
                if spec[0] in self._planned:
                    raise InputError(f"tensor {spec[0]!r} planned twice for {self.directory}")
                self._planned[spec[0]] = (fd, offsets[spec[0]], spec)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write (plan) or queue (no plan) one tensor."""
        if self._planned is not None:
            self._check_planned(name, tensor)
        with self._lock:
            if self._closed:
                raise RuntimeError("ShardedSafetensorsWriter is closed")
            if name in self._seen:
                raise InputError(f"tensor {name!r} written twice to {self.directory}")
            self._seen.add(name)
        if self._planned is not None:
            self._write_planned(name, tensor)
            return
        size = tensor_nbytes(tensor)
        with self._lock:
            if self._pending and self._pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self._pending[name] = tensor.detach().to("cpu").contiguous()
            self._pending_bytes += size
            self.total_size += size

    def _check_planned(self, name: str, tensor: torch.Tensor) -> None:
        assert self._planned is not None
        if name not in self._planned:
            raise InputError(f"tensor {name!r} is not in the output plan for {self.directory}")
        _, _, (_, dtype, shape) = self._planned[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise InputError(
                f"tensor {name!r}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
            )

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        assert self._planned is not None
        fd, offset, _ = self._planned[name]
        data = _tensor_bytes(tensor)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
        with self._lock:
            self.total_size += len(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self.directory / f"part-{len(self._parts):05d}.safetensors"
        shard = _Shard([(n, t.dtype, tuple(t.shape)) for n, t in self._pending.items()])
        header, _ = shard.header()
        with path.open("wb") as handle:
            handle.write(header)
            for tensor in self._pending.values():
                handle.write(_tensor_bytes(tensor))
        self._parts.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        """Finish the shards, write ``model.safetensors.index.json``
        (several shards); returns the shard paths."""
        with self._lock:
            if self._closed:
                return list(self._final)
            self._closed = True
        mode = 0o666 & ~_current_umask()
        weight_map: dict[str, str] = {}
        final: list[Path] = []
        if self._planned is not None:
            for _, _, fd in self._plan_files:
                os.close(fd)
            missing = [name for name in self._planned if name not in self._seen]
            if missing:
                raise InputError(
                    f"{len(missing)} planned tensors never written to {self.directory}, e.g. {missing[0]!r}"
                )
            for path, names, _ in self._plan_files:
                path.chmod(mode)
                final.append(path)
                weight_map.update(dict.fromkeys(names, path.name))
        else:
            self._flush()
            count = len(self._parts)
            for number, (path, names) in enumerate(self._parts, start=1):
                target = self.directory / _shard_name(number, count)
                os.replace(path, target)
                target.chmod(mode)
                final.append(target)
                weight_map.update(dict.fromkeys(names, target.name))
        if len(final) > 1:  # one model.safetensors needs no index (the Hugging Face layout)
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        self._final = final
        return list(final)

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._planned is not None:
            for _, _, fd in self._plan_files:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _shard_name(number: int, count: int) -> str:
    return SINGLE_FILE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    directory: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write a whole state dict as HF safetensors shards (+ index); returns the shard paths."""
    plan = [(name, t.dtype, tuple(t.shape)) for name, t in state_dict.items()]
    with ShardedSafetensorsWriter(directory, max_shard_bytes, plan=plan) as writer:
        for name, tensor in state_dict.items():
            writer.add(name, tensor)
    return sorted(p for p in Path(directory).glob("*.safetensors"))


def copy_side_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy config, generation config and tokenizer files (never weights, never hidden files).

    Returns the names copied.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    copied: list[str] = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        name = path.name
        if name in SIDE_FILE_NAMES or (name.startswith("tokenizer") and not name.endswith(".safetensors")):
            shutil.copy2(path, dst / name)
            copied.append(name)
    return copied
