"""TIES: trim each task vector to its largest ``density`` share by magnitude, elect signs, disjoint mean."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.delta._params import DENSITY, LAMBDA, WEIGHTS
from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch


@merge_method(
    "ties",
    summary="TIES: keep the top-density |delta| per variant, sign election by sum, disjoint mean",
    params=(WEIGHTS, DENSITY, LAMBDA, Param("normalize", True, kind="bool", help="disjoint mean")),
)
def ties(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """TIES of one tensor: ``k = int(density * numel)`` largest |delta| kept (ties: lower index first)."""
    from olmopt.methods.delta._kernels import Sparsifier, flatten, task_arithmetic_family
    from olmopt.methods.delta.trim import trim

    flat_base, flats = flatten(base, variants)
    numel = flat_base.numel()
    sparsifiers: list[Sparsifier | None] = [
        None if density >= 1.0 else trim(flat_base, flat, int(density * numel), chunk_elems)
        for flat, density in zip(flats, p["density"], strict=True)
    ]
    return task_arithmetic_family(
        base,
        variants,
        p["weights"],
        sparsifiers,
        sign_election=True,
        normalize=p["normalize"],
        scale=p["lambda"],
        chunk_elems=chunk_elems,
    )
