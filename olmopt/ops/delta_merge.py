"""One interface over the task-vector merge methods: ``merge_tensor(method, base, variants, ...)``.

``METHODS`` maps a method name to its params dataclass and per-tensor function. Every method takes the
base tensor and the variant tensors (listed highest priority first where order matters), a params
object, a seed and the tensor name (which, with the seed, keys the random stream), and returns the
merged tensor in the base dtype. Results never depend on chunking, threads or processing order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from olmopt.errors import InputError
from olmopt.ops.circuit import DEFAULT_CHUNK_ELEMS, CircuitParams, circuit_merge
from olmopt.ops.della import DellaParams, TaskArithmeticParams, della_merge, task_arithmetic_merge

MergeParams = CircuitParams | DellaParams | TaskArithmeticParams
TensorMerge = Callable[[torch.Tensor, list[torch.Tensor], Any, int, str, int], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its params type and per-tensor merge function."""

    name: str
    params_type: type
    merge: TensorMerge
    stochastic: bool


METHODS: dict[str, MergeMethod] = {
    "circuit": MergeMethod("circuit", CircuitParams, circuit_merge, stochastic=True),
    "della": MergeMethod("della", DellaParams, della_merge, stochastic=True),
    "task_arithmetic": MergeMethod(
        "task_arithmetic", TaskArithmeticParams, task_arithmetic_merge, stochastic=False
    ),
}

# Accepted spellings of parameter names (the original Circuit-Merge YAML, mergekit's ``lambda``).
PARAM_ALIASES = {
    "base_droprate": "base_droprate",
    "meaningful_change_threshold": "threshold",
    "lambda": "lambda_",
    "weight": "weights",
}


def get_method(method: str) -> MergeMethod:
    try:
        return METHODS[method]
    except KeyError:
        raise InputError(f"unknown merge method {method!r} (choose from {', '.join(METHODS)})") from None


def make_params(method: str, values: Mapping[str, Any] | None = None) -> MergeParams:
    """Build and validate the params dataclass of ``method`` from a plain mapping (YAML/CLI)."""
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.params_type)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in (values or {}).items():
        key = PARAM_ALIASES.get(raw_key, raw_key)
        if key == "skip_rescaling" and "rescale" in fields:
            key, value = "rescale", not value
        if key not in fields:
            raise InputError(f"{method}: unknown parameter {raw_key!r} (known: {', '.join(sorted(fields))})")
        kwargs[key] = tuple(float(v) for v in value) if isinstance(value, list | tuple) else value
    try:
        params = spec.params_type(**kwargs)
    except TypeError as exc:
        raise InputError(f"{method}: bad parameters: {exc}") from None
    validate_params(params)
    return params


def validate_params(params: MergeParams) -> None:
    """Raise InputError for out-of-range parameters (checked once, before any tensor is read)."""
    if isinstance(params, CircuitParams):
        params.validate()
    elif isinstance(params, DellaParams):
        count = _declared_count(params.density, params.epsilon, params.weights)
        params.resolved(count)


def _declared_count(*values: Any) -> int:
    for value in values:
        if isinstance(value, tuple):
            return len(value)
    return 1


def params_to_dict(params: MergeParams) -> dict[str, Any]:
    """JSON-ready view (``lambda_`` written as ``lambda``)."""
    out = {}
    for key, value in dataclasses.asdict(params).items():
        out["lambda" if key == "lambda_" else key] = list(value) if isinstance(value, tuple) else value
    return out


def merge_tensor(
    method: str,
    base: torch.Tensor,
    variants: list[torch.Tensor],
    params: MergeParams | None = None,
    seed: int = 0,
    name: str = "",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Merge one tensor with ``method``; ``params=None`` means the method's defaults."""
    spec = get_method(method)
    if params is None:
        params = spec.params_type()
    elif not isinstance(params, spec.params_type):
        raise InputError(f"{method}: expected {spec.params_type.__name__}, got {type(params).__name__}")
    return spec.merge(base, variants, params, seed, name, chunk_elems)
