"""Model Breadcrumbs: drop the largest ``gamma`` share and the smallest deltas down to ``density``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.delta._params import DENSITY, LAMBDA, WEIGHTS
from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch

GAMMA = Param(
    "gamma",
    0.01,
    low=0.0,
    high=1.0,
    per_variant=True,
    search=(0.0, 0.1),
    help="share of largest |delta| dropped",
)


def outlier_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """``(keep_top, skip_top)``: keep the ``keep_top`` largest
    minus the ``skip_top`` largest (mergekit's counts)."""
    target = int(density * numel)
    top = int(gamma * numel)
    bottom = numel - target - top
    if bottom < 0:  # fewer large ones dropped so that density is reached
        top, bottom = top + bottom, 0
    return numel - bottom, top


def _breadcrumbs(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    chunk_elems: int,
    sign_election: bool,
) -> torch.Tensor:
    from olmopt.methods.delta._kernels import (
        Magnitude,
        Sparsifier,
        delta_chunks,
        flatten,
        task_arithmetic_family,
    )

    flat_base, flats = flatten(base, variants)
    numel = flat_base.numel()
    sparsifiers: list[Sparsifier | None] = []
    for flat, density, gamma in zip(flats, p["density"], p["gamma"], strict=True):
        if density >= 1.0:
            sparsifiers.append(None)
            continue
        keep, skip = outlier_counts(numel, density, gamma)
        sparsifiers.append(Magnitude(delta_chunks(flat_base, flat, chunk_elems), numel, keep, skip))
    return task_arithmetic_family(
        base,
        variants,
        p["weights"],
        sparsifiers,
        sign_election=sign_election,
        normalize=p["normalize"],
        scale=p["lambda"],
        chunk_elems=chunk_elems,
    )


@merge_method(
    "breadcrumbs",
    summary="Model Breadcrumbs: drop the gamma largest and the smallest |delta| to density, weighted sum",
    params=(WEIGHTS, DENSITY, GAMMA, LAMBDA, Param("normalize", False, kind="bool", help="divide by sum w")),
)
def breadcrumbs(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """Breadcrumbs of one tensor (ranks by |delta|, ties broken by lower index first)."""
    return _breadcrumbs(base, variants, p, chunk_elems, sign_election=False)


@merge_method(
    "breadcrumbs_ties",
    summary="Model Breadcrumbs sparsification, then TIES sign election by sum",
    params=(WEIGHTS, DENSITY, GAMMA, LAMBDA, Param("normalize", False, kind="bool", help="disjoint mean")),
)
def breadcrumbs_ties(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """Breadcrumbs sparsification, then sign election."""
    return _breadcrumbs(base, variants, p, chunk_elems, sign_election=True)
