"""Stream a per-tensor merge (any registered method) from model directories to a new one.

``merge_directories`` checks everything first (configs, tensor names, shapes, parameters), then merges
tensor by tensor with bounded memory and writes a loadable Hugging Face directory atomically.

Inputs are read with ``os.pread`` at the offsets in each safetensors header rather than through mmap:
mmap'd pages count towards the process's resident memory until unmapped, which would make peak RSS
grow with the input size. Tensors are merged by a small thread pool (torch releases the GIL inside ops;
each worker runs single-threaded torch ops) and each result is written straight to its planned offset
in the output shards, so the output is byte-identical whatever the thread count. glibc is asked to keep
64 MiB of freed heap (``retain_freed_memory``) so that the chunk temporaries are not faulted in anew.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm import tqdm

from olmopt import __version__
from olmopt.errors import InputError, ModelError
from olmopt.methods.delta import DEFAULT_CHUNK_ELEMS, MethodParams, get_method, make_params
from olmopt.methods.delta._kernels import check_shapes
from olmopt.outdir import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_output,
    copy_side_files,
)
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.pool.checkpoint import Checkpoint
from olmopt.recipe import LayerValue, ParamMerge
from olmopt.textio import read_text

MERGE_CONFIG_FILE = "merge_config.json"

# config.json fields that fix tensor shapes or semantics: variants must agree with the base.
ARCHITECTURE_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live in a safetensors file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class PreadModel:
    """A model directory's safetensors tensors, read with ``os.pread`` (no mmap, no pickle)."""

    def __init__(self, directory: str | Path, name: str | None = None) -> None:
        self.directory = Path(directory)
        self.name = name or str(directory)
        checkpoint = Checkpoint(self.directory, self.name)  # existence, pickle refusal, index, damaged files
        checkpoint.check_complete()  # every tensor its config.json implies, with its shape
        self.entries: dict[str, TensorEntry] = {}
        for path in self._weight_files():
            self.entries.update(self._read_header(path))
        self.config = self._read_config()

    def _weight_files(self) -> list[Path]:
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return sorted({self.directory / file for file in weight_map.values()})
        return sorted(self.directory.glob("*.safetensors"))

    def _read_header(self, path: Path) -> dict[str, TensorEntry]:
        try:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelError(
                f"model {self.name}: unreadable safetensors header in {path.name}: {exc}"
            ) from None
        start = 8 + length
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            entries[key] = TensorEntry(path, info["dtype"], tuple(info["shape"]), start + begin, start + end)
        return entries

    def _read_config(self) -> dict[str, Any]:
        path = self.directory / "config.json"
        if not path.is_file():
            return {}
        try:
            return json.loads(read_text(path, f"model {self.name}:", ModelError))
        except ValueError as exc:
            raise ModelError(f"model {self.name}: malformed config.json: {exc}") from None

    def read(self, name: str, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor in its stored dtype; read into ``buffer`` (uint8, reused) when it is big enough."""
        entry = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(entry.dtype)
        if dtype is None:
            raise ModelError(f"model {self.name}: tensor {name!r} has unsupported dtype {entry.dtype}")
        size = entry.end - entry.begin
        if size == 0:
            return torch.empty(entry.shape, dtype=dtype)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.uint8)
        raw = buffer[:size]
        view, done = memoryview(raw.numpy()), 0  # type: ignore[arg-type]  # numpy arrays are buffers
        fd = os.open(entry.path, os.O_RDONLY)
        try:
            while done < size:
                got = os.preadv(fd, [view[done:]], entry.begin + done)
                if got <= 0:
                    raise ModelError(f"model {self.name}: {entry.path.name} is truncated at tensor {name!r}")
                done += got
        finally:
            os.close(fd)
        return raw.view(dtype).reshape(entry.shape)


class _ReadBuffers(threading.local):
    """Per-thread reusable read buffers (one per model), grown to the largest tensor seen."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def get(self, slot: int, size: int) -> torch.Tensor:
        while len(self.buffers) <= slot:
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        if self.buffers[slot].numel() < size:
            self.buffers[slot] = torch.empty(size, dtype=torch.uint8)
        return self.buffers[slot]


def preflight(base: PreadModel, variants: Sequence[PreadModel]) -> list[str]:
    """Check configs, names and shapes agree; returns the tensor names to merge (sorted)."""
    for variant in variants:
        for field in ARCHITECTURE_FIELDS:
            if base.config.get(field) != variant.config.get(field):
                raise InputError(
                    f"model {variant.name}: config {field}={variant.config.get(field)!r} differs from "
                    f"base {base.name} ({base.config.get(field)!r})"
                )
    for variant in variants:
        for name, entry in variant.entries.items():
            base_entry = base.entries.get(name)
            if base_entry is None:
                raise InputError(f"model {variant.name}: tensor {name!r} is missing from base {base.name}")
            if entry.shape != base_entry.shape:
                raise InputError(
                    f"model {variant.name}: tensor {name!r} has shape {entry.shape}, "
                    f"base {base.name} has {base_entry.shape}"
                )
        for name in base.entries:
            if name not in variant.entries:
                raise InputError(f"model {variant.name}: lacks tensor {name!r} that base {base.name} has")
    for model in (base, *variants):
        for name, entry in model.entries.items():
            if entry.dtype not in SAFETENSORS_DTYPES:
                raise ModelError(f"model {model.name}: tensor {name!r} has unsupported dtype {entry.dtype}")
    return sorted(base.entries)


def merge_directories(
    base_dir: str | Path,
    variant_dirs: Sequence[str | Path],
    out_dir: str | Path,
    method: str,
    params: MethodParams | None,
    seed: int = 0,
    force: bool = False,
    threads: int = 2,
    progress: bool = True,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    layer_params: Mapping[str, Sequence[LayerValue]] | None = None,
    group_size: int = 1,
) -> dict[str, Any]:
    """Merge ``variant_dirs`` (highest priority first) onto ``base_dir`` into ``out_dir``.

    ``layer_params`` makes parameters layer-wise as in a Recipe (``ParamMerge.layer_params``: one value
    per group of ``group_size`` layers overriding ``params``; the embedding takes layer 0's values, the
    final norm and the head the last layer's). Returns a summary: ``tensors``, ``seconds``, ``bytes``
    (weights written), ``shards``, ``out``. Nothing is written unless every check passes; a failure
    midway leaves no output directory.
    """
    started = time.perf_counter()
    spec = get_method(method)
    if params is None:
        params = make_params(spec.name)
    elif params.method != spec.name:
        raise ValueError(f"parameters of {params.method!r} passed to method {spec.name!r}")
    if not variant_dirs:
        raise InputError("merge: give at least one variant model")
    resolved = params.resolve(len(variant_dirs))  # counts, lengths, cross-parameter checks: before any IO
    base = PreadModel(base_dir)
    variants = [PreadModel(d) for d in variant_dirs]
    names = preflight(base, variants)
    at_layer = _layer_resolver(base, spec.name, params, layer_params or {}, group_size, len(variants))
    out = Path(out_dir)
    inputs = [base_dir, *variant_dirs]
    check_output(out, inputs, force)

    buffers = _ReadBuffers()
    retain_freed_memory()

    def merge_one(name: str) -> str:
        models = [base, *variants]
        tensors = [
            m.read(name, buffers.get(slot, m.entries[name].end - m.entries[name].begin))
            for slot, m in enumerate(models)
        ]
        if tensors[0].is_floating_point():
            check_shapes(tensors[0], tensors[1:], name)
            values = resolved if at_layer is None else at_layer(name)
            merged = spec.function(
                tensors[0], tensors[1:], values, seed=seed, name=name, chunk_elems=chunk_elems
            )
        else:
            merged = tensors[0]
        writer.add(name, merged)  # planned writer: pwrite at the tensor's offset, thread-safe
        return name

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
            plan = [(n, SAFETENSORS_DTYPES[base.entries[n].dtype], base.entries[n].shape) for n in names]
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, plan=plan)
            bar = tqdm(
                total=len(names),
                desc=f"merge {spec.name}",
                unit="tensor",
                disable=not progress,
                file=sys.stderr,
            )
            with writer:
                for _ in _ordered_map(merge_one, names, max(1, threads)):
                    bar.update(1)
                bar.close()
            shards = writer.close()
            copy_side_files(base.directory, tmp)
            record = {
                "method": spec.name,
                "params": params.as_dict(),
                **({"layer_params": dict(layer_params), "group_size": group_size} if layer_params else {}),
                "seed": seed,
                "base_model": str(base.directory),
                "variant_models": [str(v.directory) for v in variants],
                "olmopt_version": __version__,
            }
            (tmp / MERGE_CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "out": str(out),
        "method": spec.name,
        "tensors": len(names),
        "bytes": writer.total_size,
        "shards": len(shards),
        "seconds": round(time.perf_counter() - started, 3),
    }


def retain_freed_memory(pad: int = 64 << 20) -> None:
    """Let glibc keep ``pad`` bytes of freed heap instead of returning it at once (``M_TOP_PAD``).

    A merge allocates and frees the same chunk temporaries and output tensors thousands of times; by
    default glibc hands that memory back and faults it in again (3 s of system time per 3 x 309M merge,
    half of it avoidable). Process-wide and harmless elsewhere; a no-op without glibc.
    """
    try:
        ctypes.CDLL(None).mallopt(-2, pad)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def _layer_resolver(
    base: PreadModel,
    method: str,
    params: MethodParams,
    layer_params: Mapping[str, Sequence[LayerValue]],
    group_size: int,
    count: int,
) -> Callable[[str], dict[str, Any]] | None:
    """Tensor name -> its resolved parameters, for layer-wise parameters (None without them); every
    layer's values are checked here, before any output exists."""
    if not layer_params:
        return None
    adapter = ArchitectureAdapter.from_config(SimpleNamespace(**base.config), base.name)
    raw = {k: v for k, v in params.as_dict().items() if v is not None}
    try:
        merge = ParamMerge(
            method=method, base="", models=tuple(map(str, range(count))), params=raw,
            layer_params={k: tuple(v) for k, v in layer_params.items()}, group_size=group_size,
        )  # fmt: skip
    except ValueError as exc:  # pydantic: a value of the wrong type
        raise InputError(f"merge: layer-wise parameters: {str(exc).splitlines()[-1].strip()}") from None
    want = merge.num_groups(adapter.num_layers)
    for key, groups in sorted(merge.layer_params.items()):
        if len(groups) != want:
            raise InputError(f"merge: {key} has {len(groups)} values for {want} layer groups")
    per_layer = []
    for layer in range(adapter.num_layers):
        try:
            per_layer.append(make_params(method, merge.params_at(layer)).resolve(count))
        except InputError as exc:
            raise InputError(f"merge: layer {layer}: {exc}") from None
    return lambda name: per_layer[adapter.merge_layer(name)]


def _ordered_map(func: Callable[[str], str], items: Sequence[str], threads: int) -> Iterator[tuple[str, str]]:
    """``(item, func(item))`` in input order, computing up to ``2*threads`` items ahead."""
    if threads == 1:
        for item in items:
            yield item, func(item)
        return
    window = 2 * threads
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="olmopt-merge") as pool:
        pending: deque[tuple[str, Future[str]]] = deque()
        iterator = iter(items)
        try:
            for item in iterator:
                pending.append((item, pool.submit(func, item)))
                if len(pending) >= window:
                    name, future = pending.popleft()
                    yield name, future.result()
            while pending:
                name, future = pending.popleft()
                yield name, future.result()
        finally:
            for _, future in pending:
                future.cancel()
