"""Per-tensor delta merge methods, one module each, registered in ``olmopt.methods.registry``.

Import this package (not the registry alone) to see every built-in method: it imports each method
module, and re-exports the registry's lookups and ``merge_tensor``. Importing it loads no torch. The
package also holds the methods' shared maths (``_kernels``, ``circuit_maths``, ``della_maths``,
``seeded_uniform``) and ``stream`` (a streaming merge of model directories).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from olmopt.methods.delta import (  # noqa: F401 - each import registers its methods
    breadcrumbs,
    circuit,
    dare,
    della,
    linear,
    model_stock,
    multislerp,
    slerp,
    task_arithmetic,
    ties,
)
from olmopt.methods.registry import (
    MethodParams,
    MethodSpec,
    canonical_name,
    get_method,
    make_params,
    registered,
)

if TYPE_CHECKING:
    import torch

DEFAULT_CHUNK_ELEMS = 1 << 18

__all__ = [
    "DEFAULT_CHUNK_ELEMS",
    "MethodParams",
    "MethodSpec",
    "canonical_name",
    "get_method",
    "make_params",
    "merge_tensor",
    "registered",
]


def merge_tensor(
    method: str,
    base: torch.Tensor,
    variants: Sequence[torch.Tensor],
    params: MethodParams | Mapping[str, Any] | None = None,
    seed: int = 0,
    name: str = "",
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Merge one tensor with ``method`` (``params``: validated values, a raw mapping, or None = defaults)."""
    spec = get_method(method)
    if not isinstance(params, MethodParams):
        params = make_params(spec.name, params)
    elif params.method != spec.name:
        raise ValueError(f"parameters of {params.method!r} passed to method {spec.name!r}")
    from olmopt.methods.delta._kernels import check_shapes  # torch: only when merging

    check_shapes(base, variants, name)
    return spec.function(
        base,
        list(variants),
        params.resolve(len(variants)),
        seed=int(seed),
        name=name,
        chunk_elems=int(chunk_elems),
    )
