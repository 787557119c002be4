"""Conformance kit for merge methods (as optuna keeps ``optuna/testing``): ``check_method(name)``.

Runs the registry contract (``olmopt.methods.registry``) against one registered method on small
random tensors and raises ``AssertionError`` naming the method and the broken rule:

- declarations: defaults validate; every search dimension's bounds give valid parameters; values
  just outside a declared bound, and NaN, are refused with ``InputError``;
- variant counts outside the declared range are refused;
- the result keeps the base's shape and dtype (float32, bfloat16, float16) and is finite;
- the result does not depend on ``chunk_elems``;
- the inputs are left untouched;
- a stochastic method depends on the seed and the tensor name, a deterministic one on neither.

Torch is imported by the checks, not by this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from olmopt.errors import InputError
from olmopt.methods.delta import get_method, make_params, merge_tensor, registered
from olmopt.methods.registry import MethodSpec, Param

if TYPE_CHECKING:
    import torch

CHUNKS = (1_000, 4_096 + 17, 10_000_000)
SHAPE = (37, 129)


def variant_count(spec: MethodSpec) -> int:
    """A count the method accepts, preferring three variants."""
    return max(spec.min_variants, min(3, spec.max_variants or 3))


def example_family(
    count: int, dtype: Any = None, shape: tuple[int, ...] = SHAPE, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` nearby variants (with a few exact zeros and equal deltas)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    variants = []
    for index in range(count):
        variant = base + 0.05 * torch.randn(shape, generator=generator)
        flat = variant.view(-1)
        flat[index::11] = base.view(-1)[index::11]  # zero deltas
        flat[5 + index :: 13] = base.view(-1)[5 + index :: 13] + 0.03  # tied magnitudes
        variants.append(variant)
    dtype = dtype or torch.bfloat16
    return base.to(dtype), [v.to(dtype) for v in variants]


def interesting_params(spec: MethodSpec, count: int) -> list[dict[str, Any]]:
    """Defaults, plus the low and high corners of the method's search space."""
    dims = spec.search_dims(count)
    points: list[dict[str, Any]] = [{}]
    for pick in (lambda d: d.low, lambda d: d.high):
        values = {d.name: (int(pick(d)) if d.kind == "int" else float(pick(d))) for d in dims}
        if dims:
            points.append(spec.params_from_search(values, count))
    return points


def _fail(spec: MethodSpec, rule: str) -> AssertionError:
    return AssertionError(f"merge method {spec.name!r} ({spec.module}): {rule}")


def check_declarations(spec: MethodSpec) -> None:
    count = variant_count(spec)
    for point in interesting_params(spec, count):
        try:
            make_params(spec.name, point).resolve(count)
        except InputError as exc:
            raise _fail(spec, f"search point {point} is not valid: {exc}") from None
    for param in spec.params:
        for bad in _outside(param):
            try:
                make_params(spec.name, {param.name: bad})
            except InputError as exc:
                if param.name not in str(exc):
                    raise _fail(spec, f"the error for {param.name}={bad!r} does not name it: {exc}") from None
            else:
                raise _fail(spec, f"{param.name}={bad!r} is outside its declaration but was accepted")


def _outside(param: Param) -> list[Any]:
    if param.kind == "bool":
        return [1.5]
    values: list[Any] = [math.nan, math.inf]
    if param.low is not None:
        values.append(param.low if param.low_open else param.low - 1e-3 * max(1.0, abs(param.low)))
    if param.high is not None:
        values.append(param.high if param.high_open else param.high + 1e-3 * max(1.0, abs(param.high)))
    return values


def check_variant_counts(spec: MethodSpec) -> None:
    bad = [spec.min_variants - 1] + ([spec.max_variants + 1] if spec.max_variants is not None else [])
    for count in bad:
        if count < 1:
            continue
        base, variants = example_family(count)
        try:
            merge_tensor(spec.name, base, variants, None, 0, "w")
        except InputError:
            continue
        raise _fail(spec, f"{count} variants are outside the declared range but were accepted")


def check_dtypes_and_inputs(spec: MethodSpec) -> None:
    import torch

    count = variant_count(spec)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base, variants = example_family(count, dtype)
        copies = [base.clone(), *[v.clone() for v in variants]]
        for point in interesting_params(spec, count):
            merged = merge_tensor(spec.name, base, variants, point, 3, "layer.w")
            if merged.dtype != dtype or merged.shape != base.shape:
                raise _fail(spec, f"{dtype} in, {merged.dtype} {tuple(merged.shape)} out (params {point})")
            if not torch.isfinite(merged.float()).all():
                raise _fail(spec, f"non-finite values for {dtype} inputs (params {point})")
        if not all(torch.equal(a, b) for a, b in zip([base, *variants], copies, strict=True)):
            raise _fail(spec, f"modified its inputs ({dtype})")


def check_chunk_independence(spec: MethodSpec) -> None:
    import torch

    count = variant_count(spec)
    for shape in (SHAPE, (SHAPE[0] * SHAPE[1],)):
        base, variants = example_family(count, shape=shape)
        for point in interesting_params(spec, count):
            params = make_params(spec.name, point)
            reference = merge_tensor(spec.name, base, variants, params, 5, "layer.w", chunk_elems=CHUNKS[0])
            for chunk in CHUNKS[1:]:
                if not torch.equal(
                    merge_tensor(spec.name, base, variants, params, 5, "layer.w", chunk_elems=chunk),
                    reference,
                ):
                    raise _fail(
                        spec, f"chunk_elems={chunk} changes the result (shape {shape}, params {point})"
                    )


def check_seed_dependence(spec: MethodSpec) -> None:
    import torch

    base, variants = example_family(variant_count(spec), torch.float32)
    # a point with random drops: densities below 1 where the method has them
    point = {p.name: 0.5 for p in spec.params if p.name == "density"}
    reference = merge_tensor(spec.name, base, variants, point, 7, "layer.w")
    others = [
        merge_tensor(spec.name, base, variants, point, 8, "layer.w"),
        merge_tensor(spec.name, base, variants, point, 7, "layer.v"),
    ]
    same = [torch.equal(o, reference) for o in others]
    if spec.stochastic and any(same):
        raise _fail(spec, "declared stochastic, but the result ignores the seed or the tensor name")
    if not spec.stochastic and not all(same):
        raise _fail(spec, "declared deterministic, but the result depends on the seed or the tensor name")


CHECKS: tuple[Callable[[MethodSpec], None], ...] = (
    check_declarations,
    check_variant_counts,
    check_dtypes_and_inputs,
    check_chunk_independence,
    check_seed_dependence,
)


def check_method(name: str) -> None:
    """Run every check on registered method ``name``; AssertionError on the first broken rule."""
    spec = get_method(name)
    for check in CHECKS:
        check(spec)


def check_all() -> list[str]:
    """Check every registered method; returns their names."""
    names = sorted(registered())
    for name in names:
        check_method(name)
    return names
