"""Pure fusion maths: the iterative chain against its closed form, and the MKA similarity pieces."""

from __future__ import annotations

import math

import pytest
import torch

from olmopt.methods.fusion.maths import (
    check_chain,
    diffusion_embedding,
    fuse_chain,
    fuse_pair,
    fuse_tail,
    fusion_coefficients,
    fusion_pairs,
    fusion_ratio,
    fusion_steps,
    knn_entropy,
    knn_mutual_information,
    layer_similarity,
    rank_normalise,
    tail_coefficients,
)
from olmopt.recipe import FusionStep

torch.set_num_threads(1)


def test_two_steps_by_hand() -> None:
    # 2 <- 3 with 0.6, then 1 <- 2' with 0.3: 0.3 W1 + 0.7 (0.6 W2 + 0.4 W3)
    coefficients = fusion_coefficients(4, [0.6, 0.3])
    assert coefficients[0] == {0: 1.0}
    assert set(coefficients) == {0, 1}
    assert coefficients[1] == pytest.approx({1: 0.3, 2: 0.42, 3: 0.28})


def test_closed_form_matches_seed_formula_for_llama3_8b() -> None:
    alphas = [0.62 + 0.01 * j for j in range(13)]
    c = fusion_coefficients(32, alphas)[18]
    assert sorted(c) == list(range(18, 32))
    for k in range(13):
        expected = alphas[12 - k] * math.prod(1 - alphas[j] for j in range(13 - k, 13))
        assert c[18 + k] == pytest.approx(expected)
    assert c[31] == pytest.approx(math.prod(1 - a for a in alphas))
    assert sum(c.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("num_layers,steps", [(2, 1), (4, 3), (6, 2), (9, 5)])
def test_iterative_chain_equals_closed_form(num_layers: int, steps: int) -> None:
    gen = torch.Generator().manual_seed(num_layers * 10 + steps)
    layers = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(num_layers)]
    alphas = torch.rand(steps, generator=gen, dtype=torch.float64).tolist()
    fused = fuse_chain(layers, alphas)
    assert len(fused) == num_layers - steps
    for survivor, weights in fusion_coefficients(num_layers, alphas).items():
        expected = sum(c * layers[i] for i, c in weights.items())
        torch.testing.assert_close(fused[survivor], expected, rtol=1e-6, atol=1e-6)
    survivor = num_layers - 1 - steps
    torch.testing.assert_close(
        fuse_tail(layers[survivor:], torch.tensor(alphas)), fused[survivor], rtol=1e-6, atol=1e-6
    )


def test_tail_coefficients_are_differentiable() -> None:
    alphas = torch.tensor([0.2, 0.7, 0.4], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(tail_coefficients, (alphas,))
    assert tail_coefficients(torch.zeros(0)).tolist() == [1.0]


def test_fuse_pair_computes_in_float32_and_keeps_dtype() -> None:
    keep = torch.full((4,), 1.0, dtype=torch.bfloat16)
    drop = torch.full((4,), 3.0, dtype=torch.bfloat16)
    fused = fuse_pair(keep, drop, 0.25)
    assert fused.dtype == torch.bfloat16
    assert fused.tolist() == [2.5] * 4
    with pytest.raises(ValueError, match="shapes"):
        fuse_pair(keep, torch.zeros(3), 0.5)


def test_pairs_and_limits() -> None:
    pairs = fusion_pairs(32, 13)
    assert pairs[0] == (30, 31) and pairs[-1] == (18, 19)
    assert fusion_steps(4, [0.1, 0.2]) == [
        FusionStep(into=2, remove=3, alpha=0.1),
        FusionStep(into=1, remove=2, alpha=0.2),
    ]  # the Recipe's type
    check_chain(4, 3)
    with pytest.raises(ValueError, match="at most 3"):
        check_chain(4, 4)


def test_mutual_information_separates_dependent_from_independent() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=gen, dtype=torch.float64)
    noise = torch.randn(200, generator=gen, dtype=torch.float64)
    dependent = knn_mutual_information(x, x + 0.1 * noise)
    independent = knn_mutual_information(x, noise)
    assert dependent > 1.0
    assert 0.0 <= independent < 0.1


def test_similarity_pipeline_over_samples() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    reps = [base, base + 0.01 * torch.randn(16, 8, generator=gen, dtype=torch.float64)]
    reps.append(torch.randn(16, 8, generator=gen, dtype=torch.float64))
    embeddings = [rank_normalise(diffusion_embedding(r)) for r in reps]
    for e in embeddings:
        assert e.shape == (16, 2)
        assert float(e.min()) >= 0.0 and float(e.max()) < 1.0
    assert math.isfinite(knn_entropy(embeddings[0], k=50))
    sim = layer_similarity(embeddings)
    assert torch.equal(sim, sim.T)
    assert bool(torch.isfinite(sim).all())
    assert float(sim[0, 1]) > float(sim[0, 2])  # near-copies are more similar than unrelated samples
    alpha = fusion_ratio(sim, 0, 2)
    assert 0.5 < alpha < 1 / (1 + math.exp(-1))


def test_fusion_ratio_of_equal_rows_is_sigmoid_half() -> None:
    sim = torch.ones(3, 3)
    assert fusion_ratio(sim, 1, 2) == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert fusion_ratio(torch.zeros(3, 3), 1, 2) == pytest.approx(1 / (1 + math.exp(-0.5)))
