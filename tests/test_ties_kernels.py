"""The fast TIES / DARE-TIES kernels give the same bits as before them (tests/_ties_reference.py).

Random families with tied magnitudes (bf16 deltas), exact zeros and signed zeros, equal and opposite
deltas (a zero sum elects +), 1 to 5 variants, odd weights; every route of the trim (whole-tensor
rank, counting pass, bracket gather, radix fallback); chunk sizes and worker threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from _ties_reference import dare_ties as reference_dare_ties
from _ties_reference import ties as reference_ties

from olmopt.methods.delta import merge_tensor
from olmopt.methods.delta._kernels import TopK, delta_chunks
from olmopt.methods.delta.trim import SAMPLE, Cut, select_cut

torch.set_num_threads(1)


def family(
    numel: int, count: int, dtype: torch.dtype, seed: int, spread: float = 2e-3
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` variants with zeros, -0, equal magnitudes and exactly opposite deltas."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator) * 0.02
    base[::97] = -0.0
    variants = []
    for index in range(count):
        delta = torch.randn(numel, generator=generator) * spread
        delta[index::7] = 0.0  # zero deltas
        delta[3 + index :: 11] = 1e-3  # tied magnitudes, both signs below
        delta[5 + index :: 22] = -1e-3
        variants.append(base + delta)
    if count > 1:
        variants[1][::13] = base[::13] - (variants[0][::13] - base[::13])  # opposite: the sum is 0
    return base.to(dtype), [v.to(dtype) for v in variants]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.int8), b.view(-1).view(torch.int8))


CASES = [  # numel, variants, dtype, weights, densities
    (1_000, 2, torch.bfloat16, [0.5, 0.5], [0.5, 0.5]),
    (50_000, 1, torch.bfloat16, [2.0], [0.3]),
    (150_000, 2, torch.bfloat16, [0.5, 0.5], [0.5, 0.5]),
    (150_000, 3, torch.float32, [1.0, 0.3, 0.7], [0.2, 0.5, 0.9]),
    (150_000, 5, torch.bfloat16, [0.4, 1.0, 0.2, 0.7, 0.1], [0.5, 0.3, 0.7, 0.5, 1.0]),
    (150_000, 2, torch.float16, [1.0, -1.0], [0.5, 0.5]),  # weights summing to zero
    (150_000, 2, torch.bfloat16, [-0.5, 2.0], [0.05, 0.95]),  # a negative weight
    (150_000, 2, torch.float32, [1e-39, 0.5], [0.5, 0.5]),  # a weight below the smallest normal
]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("numel", "count", "dtype", "weights", "densities"), CASES)
def test_ties_and_dare_ties_keep_the_previous_bits(
    numel: int,
    count: int,
    dtype: torch.dtype,
    weights: list[float],
    densities: list[float],
    normalize: bool,
) -> None:
    base, variants = family(numel, count, dtype, seed=numel + count)
    params = {"weights": weights, "density": densities, "normalize": normalize, "lambda": 0.7}
    for chunk in (4_096 + 3, 1 << 18):
        got = merge_tensor("ties", base, variants, params, chunk_elems=chunk)
        want = reference_ties(base, variants, weights, densities, normalize, 0.7, chunk)
        assert same_bits(got, want), (chunk, "ties")
        got = merge_tensor("dare_ties", base, variants, params, seed=4, name="w", chunk_elems=chunk)
        want = reference_dare_ties(base, variants, weights, densities, 4, "w", normalize, True, 0.7, chunk)
        assert same_bits(got, want), (chunk, "dare_ties")


def _radix_mask(base: torch.Tensor, variant: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    top = TopK(delta_chunks(base, variant, chunk), k, base.numel())
    return torch.cat([top.mask(m) for m in delta_chunks(base, variant, chunk)()]).bool()


def _cut_mask(cut: Cut, base: torch.Tensor, variant: torch.Tensor, chunk: int) -> torch.Tensor:
    """The elements ``cut`` keeps, by its definition; ``Cut.apply`` must keep exactly those deltas."""
    delta = variant.float() - base.float()
    magnitude, index = delta.abs(), torch.arange(delta.numel())
    mask = (magnitude > cut.threshold) | ((magnitude == cut.threshold) & (index < cut.split))
    applied = torch.cat([cut.apply(piece.clone(), start) for start, piece in zip(
        range(0, delta.numel(), chunk), delta.split(chunk), strict=True
    )])  # fmt: skip
    assert torch.equal(applied, torch.where(mask, delta, torch.zeros_like(delta)))
    return mask


@pytest.mark.parametrize(
    ("spread", "dtype", "route"),
    [  # across the densities each family takes both the counting pass and the bracket gather
        (2e-3, torch.float32, "distinct"),
        (2e-3, torch.bfloat16, "bf16"),
        (0.0, torch.bfloat16, "zeros"),  # mostly zero deltas: the threshold is 0 from density 0.5 on
    ],
)
def test_every_trim_route_keeps_the_radix_selection(spread: float, dtype: torch.dtype, route: str) -> None:
    numel = 8 * SAMPLE + 123
    base, (variant,) = family(numel, 1, dtype, seed=7, spread=spread)
    flat_base, flat = base.view(-1), variant.view(-1)
    for density in (0.05, 0.5, 0.83, 0.97):
        k = int(density * numel)
        cut = select_cut(flat_base, flat, k, 1 << 15)
        assert cut is not None, (route, density)
        for chunk in (1_000, 1 << 15):
            mask = _cut_mask(cut, flat_base, flat, chunk)
            assert int(mask.sum()) == k
            assert torch.equal(mask, _radix_mask(flat_base, flat, k, chunk)), (route, density, chunk)


def test_a_bracket_reaching_zero_falls_back_to_the_radix_with_the_same_bits() -> None:
    numel = 8 * SAMPLE
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(numel, generator=generator)
    variant = base + torch.randn(numel, generator=generator) * 1e-2
    zero = torch.rand(numel, generator=generator) < 0.4
    variant[zero] = base[zero]  # 40 % exact zeros, the rest distinct
    k = int(0.59 * numel)  # the threshold is among the smallest nonzero deltas: the bracket reaches 0
    assert select_cut(base, variant, k, 1 << 15) is None
    got = merge_tensor("ties", base, [variant, base + 0.5 * (variant - base)], {"density": 0.59})
    want = reference_ties(base, [variant, base + 0.5 * (variant - base)], [1.0, 1.0], [0.59, 0.59])
    assert same_bits(got, want)


def test_results_do_not_depend_on_worker_threads() -> None:
    tensors = [family(40_000 + 1_000 * i, 2, torch.bfloat16, seed=i) for i in range(8)]
    params = {"weights": [0.5, 0.5], "density": [0.5, 0.5]}

    def merge_all(threads: int, method: str) -> list[torch.Tensor]:
        with ThreadPoolExecutor(threads) as pool:
            return list(
                pool.map(lambda t: merge_tensor(method, t[0], t[1], params, seed=1, name="w"), tensors)
            )

    for method in ("ties", "dare_ties"):
        one, four = merge_all(1, method), merge_all(4, method)
        assert all(same_bits(a, b) for a, b in zip(one, four, strict=True))
