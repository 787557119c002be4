"""Circuit-Merge! (priority drop rates, MAGPRUNE, sign-conflict overwrite); maths in ``circuit_maths``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.registry import Param, merge_method

if TYPE_CHECKING:
    import torch


def _circuit_params(p: Mapping[str, Any]) -> Any:
    from olmopt.methods.delta.circuit_maths import CircuitParams

    return CircuitParams(
        temperature=p["temperature"],
        base_droprate=p["base_droprate"],
        threshold=p["threshold"],
        epsilon=p["epsilon"],
        rescale=p["rescale"],
        drop_rates=p["drop_rates"],
    )


def _check(p: Mapping[str, Any], count: int) -> None:
    params = _circuit_params(p)
    params.validate()
    params.rates(count)


@merge_method(
    "circuit",
    summary="Circuit-Merge!: priority drop rates, MAGPRUNE, sign-conflict overwrite, temperature blend",
    params=(
        Param(
            "temperature",
            0.0,
            low=0.0,
            high=1.0,
            search=(0.0, 1.0),
            help="0 = priority decay, 1 = running mean",
        ),
        Param(
            "base_droprate",
            0.5,
            low=0.0,
            high=1.0,
            high_open=True,
            search=(0.05, 0.9),
            help="drop rate of the top-priority variant",
        ),
        Param(
            "threshold",
            2e-6,
            low=0.0,
            search=(1e-8, 1e-4, "log"),
            aliases=("meaningful_change_threshold",),
            help="|delta| below this counts as unchanged",
        ),
        Param(
            "epsilon", 0.1, low=0.0, high=1.0, high_open=True, help="spread of MAGPRUNE drop probabilities"
        ),
        Param("rescale", True, kind="bool", help="rescale survivors by 1/(1-p)"),
        Param(
            "drop_rates",
            None,
            low=0.0,
            high=1.0,
            high_open=True,
            per_variant=True,
            help="explicit drop rate per variant (overrides temperature/base_droprate)",
        ),
    ),
    stochastic=True,
    priority_ordered=True,
    aliases=("circuit_merge", "circuit-merge"),
    check=_check,
)
def circuit(
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    p: Mapping[str, Any],
    *,
    seed: int,
    name: str,
    chunk_elems: int,
) -> torch.Tensor:
    """Circuit-Merge! of one tensor; variants listed highest priority first."""
    from olmopt.methods.delta.circuit_maths import circuit_merge

    return circuit_merge(base, list(variants), _circuit_params(p), seed, name, chunk_elems)
