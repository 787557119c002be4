"""DARE: drop each delta element with probability ``1 - density`` and rescale; linear or TIES-style."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.delta._params import DENSITY, LAMBDA, WEIGHTS
from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch

RESCALE = Param("rescale", True, kind="bool", help="divide survivors by density")


def _dare(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    seed: int,
    name: str,
    chunk_elems: int,
    sign_election: bool,
) -> torch.Tensor:
    from olmopt.methods.delta._kernels import Bernoulli, Sparsifier, task_arithmetic_family

    sparsifiers: list[Sparsifier | None] = [
        Bernoulli(density, p["rescale"], seed, name, index) for index, density in enumerate(p["density"])
    ]
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
    "dare_linear",
    summary="DARE: keep each delta with probability density, rescale by 1/density, weighted sum",
    params=(
        WEIGHTS,
        DENSITY,
        LAMBDA,
        Param("normalize", False, kind="bool", help="divide by sum w"),
        RESCALE,
    ),
    stochastic=True,
)
def dare_linear(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """DARE drop-and-rescale per variant (keyed per-element draws), then the weighted sum."""
    return _dare(base, variants, p, seed, name, chunk_elems, sign_election=False)


@merge_method(
    "dare_ties",
    summary="DARE drop-and-rescale, then TIES sign election by sum",
    params=(WEIGHTS, DENSITY, LAMBDA, Param("normalize", False, kind="bool", help="disjoint mean"), RESCALE),
    stochastic=True,
)
def dare_ties(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """DARE drop-and-rescale per variant, then sign election (and disjoint mean when normalize)."""
    return _dare(base, variants, p, seed, name, chunk_elems, sign_election=True)
