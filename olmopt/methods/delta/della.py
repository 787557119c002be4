"""DELLA and DELLA-linear (rank-based magnitude sampling); maths in ``olmopt.methods.delta.della_maths``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.registry import Param, SearchDim, merge_method

if TYPE_CHECKING:
    import torch


def _della_params(p: Mapping[str, Any]) -> Any:
    from olmopt.methods.delta.della_maths import DellaParams

    return DellaParams(
        density=p["density"],
        epsilon=p["epsilon"],
        weights=p["weights"],
        lambda_=p["lambda"],
        normalize=p["normalize"],
        rescale=p["rescale"],
        sign_election=p["sign_election"],
    )


def _check(p: Mapping[str, Any], count: int) -> None:
    _della_params(p).resolved(count)


def _from_search(values: Mapping[str, float]) -> dict[str, Any]:
    """``epsilon`` is searched as a share of the room density leaves: ``share * min(d, 1 - d)``."""
    density = float(values["density"])
    return {
        "density": density,
        "epsilon": float(values["epsilon_share"]) * min(density, 1.0 - density),
        "lambda": values["lambda"],
    }


def _params(sign_election: bool, normalize: bool) -> tuple[Param, ...]:
    return (
        Param("density", 0.5, low=0.0, high=1.0, low_open=True, per_variant=True, help="keep fraction"),
        Param(
            "epsilon",
            0.15,
            low=0.0,
            high=1.0,
            high_open=True,
            per_variant=True,
            help="spread of keep probabilities around density",
        ),
        Param("weights", 1.0, per_variant=True, aliases=("weight",), help="weight per variant"),
        Param("lambda", 1.0, help="scale of the merged delta"),
        Param("normalize", normalize, kind="bool", help="divide by the weights of the agreeing deltas"),
        Param("rescale", True, kind="bool", help="rescale survivors by 1/keep probability"),
        Param("sign_election", sign_election, kind="bool", help="TIES sign election (off: della_linear)"),
    )


_SEARCH = (
    SearchDim("density", 0.2, 1.0),
    SearchDim("epsilon_share", 0.0, 0.95),
    SearchDim("lambda", 0.1, 1.5),
)


def _della(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    from olmopt.methods.delta.della_maths import della_merge

    return della_merge(base, list(variants), _della_params(p), seed, name, chunk_elems)


merge_method(
    "della",
    summary="DELLA: per-row rank-based keep probability, rescale, sign election, disjoint mean, lambda",
    params=_params(sign_election=True, normalize=True),
    stochastic=True,
    aliases=("della_magprune",),
    check=_check,
    search=_SEARCH,
    from_search=_from_search,
)(_della)

merge_method(
    "della_linear",
    summary="DELLA without sign election: per-row rank-based keep probability, rescale, weighted sum",
    params=_params(sign_election=False, normalize=False),
    stochastic=True,
    check=_check,
    search=_SEARCH,
    from_search=_from_search,
)(_della)
