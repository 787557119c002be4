"""SVD-ES and norm-ES operators: population size, damping, replay determinism, skips, validation."""

from __future__ import annotations

import math

import pytest
import torch

from olmopt.errors import InputError
from olmopt.methods.es import maths as es

torch.set_num_threads(1)


def _w(rows: int = 12, cols: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize(
    ("d", "lam"),
    [
        (1, 4),
        (2, 6),
        (512, 22),
        (1024, 24),
        (2560, 27),
        (3584, 28),
        (4096, 28),
        (9728, 31),
        (18944, 33),
        (151936, 39),
    ],
)
def test_population_size(d: int, lam: int) -> None:
    assert es.es_population_size(d) == lam


def test_damping_hand_example() -> None:
    # S = [4, 1]: raw sqrt(4/4)=1, sqrt(4/1)=2; mean 1.5 -> [2/3, 4/3]
    got = es.svd_damping(torch.tensor([4.0, 1.0]))
    assert torch.allclose(got, torch.tensor([2 / 3, 4 / 3]), atol=1e-6)
    assert got.mean().item() == pytest.approx(1.0)
    flat = es.svd_damping(torch.tensor([0.5, 0.5, 0.5]))
    assert torch.allclose(flat, torch.ones(3))


def test_svd_basis_normalises_and_reconstructs() -> None:
    W = torch.tensor([[3.0, 0.0], [0.0, -6.0], [0.0, 0.0]])
    basis = es.svd_basis(W)
    assert basis is not None
    assert torch.allclose(basis.S, torch.tensor([1.0, 0.5]))  # singular values of W / 6
    assert torch.allclose((basis.U * basis.S) @ basis.Vh * 6.0, W, atol=1e-6)


def test_svd_basis_drops_null_singular_values() -> None:
    W = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0]))  # rank 1
    basis = es.svd_basis(W)
    assert basis is not None and basis.S.numel() == 1


def test_svd_noise_hand_example() -> None:
    # Identity basis on a 2x2: add = diag(delta * damping); S=[1, 0.25] -> damping [1/1.5, 2/1.5]
    basis = es.SvdBasis(U=torch.eye(2), S=torch.tensor([1.0, 0.25]), Vh=torch.eye(2))
    mult, add = es.svd_noise((2, 2), basis, torch.tensor([0.3, 3.0]))
    assert torch.allclose(add, torch.tensor([[0.2, 0.0], [0.0, 3.0]]), atol=1e-6)  # 4.0 clamped to 3
    assert torch.allclose(mult, torch.exp(add))


@pytest.mark.parametrize("step", [es.svd_es_step, es.norm_es_step])
def test_replay_is_bit_identical_and_seed_dependent(step) -> None:
    W = _w()
    a = step(W, 0.1, 7)
    b = step(W.clone(), 0.1, 7)
    c = step(W, 0.1, 8)
    assert a is not None and b is not None and c is not None
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, W)
    assert torch.equal(W, _w())  # the input is never modified


@pytest.mark.parametrize("step", [es.svd_es_step, es.norm_es_step])
def test_offspring_keeps_dtype_and_shape(step) -> None:
    W = _w(dtype=torch.bfloat16)
    out = step(W, 0.05, 1)
    assert out is not None and out.dtype == torch.bfloat16 and out.shape == W.shape


def test_svd_step_is_multiplicative_noise_from_seeded_delta() -> None:
    W = _w()
    basis = es.svd_basis(W)
    assert basis is not None
    delta = torch.randn(basis.S.numel(), generator=torch.Generator().manual_seed(3)) * 0.2
    mult, _ = es.svd_noise(W.shape, basis, delta)
    assert torch.equal(es.svd_es_step(W, 0.2, 3), W * mult)
    assert torch.equal(es.svd_es_step(W, 0.2, 3, basis=basis), W * mult)
    # signs never flip: exp() noise is positive
    assert bool(((W * es.svd_es_step(W, 0.2, 3)) >= 0).all())


def test_norm_step_keeps_directions_and_scales_rows() -> None:
    W = _w()
    out = es.norm_es_step(W, 0.3, 5)
    assert out is not None
    z = torch.randn(W.shape[0], generator=torch.Generator().manual_seed(5)) * 0.3
    ratio = out.norm(dim=1) / W.norm(dim=1)
    assert torch.allclose(ratio, torch.exp(z), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out, W, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)


def test_norm_step_zero_row_stays_zero() -> None:
    W = _w()
    W[2] = 0.0
    out = es.norm_es_step(W, 0.1, 0)
    assert out is not None and torch.equal(out[2], torch.zeros(W.shape[1]))


@pytest.mark.parametrize(
    "W",
    [
        torch.randn(16),  # 1-D
        torch.randn(1, 16),  # a dim of 1
        torch.randn(16, 1),
        torch.randint(0, 5, (4, 4)),  # not float
    ],
)
def test_not_applicable_is_skipped(W: torch.Tensor) -> None:
    assert not es.es_applicable(W)
    assert es.svd_basis(W) is None
    assert es.svd_es_step(W, 0.1, 0) is None
    assert es.norm_es_step(W, 0.1, 0) is None
    assert es.svd_initial_sigma(W, 0.1) is None


def test_all_zero_and_nonfinite_skipped() -> None:
    assert es.es_applicable(torch.zeros(4, 4))
    assert es.svd_basis(torch.zeros(4, 4)) is None
    assert es.svd_es_step(torch.zeros(4, 4), 0.1, 0) is None
    bad = _w()
    bad[0, 0] = math.nan
    assert es.svd_es_step(bad, 0.1, 0) is None
    assert es.norm_es_step(bad, 0.1, 0) is None


def test_overflow_returns_none() -> None:
    W = torch.full((4, 4), 60000.0, dtype=torch.float16)  # exp(noise) pushes past fp16's 65504
    assert es.norm_es_step(W, 50.0, 0) is None


@pytest.mark.parametrize("sigma", [0.0, -0.1, math.nan, math.inf])
def test_bad_sigma(sigma: float) -> None:
    for call in (
        lambda: es.svd_es_step(_w(), sigma, 0),
        lambda: es.norm_es_step(_w(), sigma, 0),
        lambda: es.svd_initial_sigma(_w(), sigma),
        lambda: es.norm_es_decay(sigma),
    ):
        with pytest.raises(InputError, match="sigma must be > 0"):
            call()


def test_bad_seed() -> None:
    with pytest.raises(InputError, match="seed"):
        es.svd_es_step(_w(), 0.1, -1)


def test_sigma_rules() -> None:
    W = torch.diag(torch.tensor([4.0, 2.0, 1.0]))  # normalised S = [1, 0.5, 0.25], unbiased std 0.38188
    std = torch.tensor([1.0, 0.5, 0.25]).std().item()
    assert es.svd_initial_sigma(W, 0.05) == pytest.approx(0.05 * std)
    assert es.svd_sigma_after_acceptance(W, 0.05) == pytest.approx(0.8 * 0.05 * std)
    assert es.norm_es_decay(0.01) == pytest.approx(0.009)


def test_higher_rank_tensor_is_matricised() -> None:
    W = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1))
    out = es.svd_es_step(W, 0.1, 2)
    assert out is not None and out.shape == W.shape
    assert torch.equal(out, es.svd_es_step(W, 0.1, 2))
