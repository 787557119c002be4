"""Pure merge ops: Circuit-Merge (calculate_p, MAGPRUNE, priority blend), DELLA, task arithmetic."""

from __future__ import annotations

import pytest
import torch

from olmopt.errors import InputError
from olmopt.methods.delta import make_params, merge_tensor, registered
from olmopt.methods.delta.circuit_maths import CircuitParams, calculate_p, circuit_merge, drop_rates, magprune
from olmopt.methods.delta.della_maths import DellaParams, della_merge, keep_probabilities
from olmopt.methods.delta.seeded_uniform import uniform01, uniform_int16

torch.set_num_threads(1)

# the three methods these tests were written for; every registered method: tests/test_merge_methods.py
LEGACY_METHODS = ("circuit", "della", "task_arithmetic")

# Hand-derived from keep = (1-T) * 0.5**(count - max(i,2) + 1) * 2(1-b) + T(1-b), p = 1 - keep, b = 0.5;
# listed for i = 1 (lowest priority, processed first) .. count (highest priority).
EXPECTED_P = {
    (2, 0.0): [0.5, 0.5],
    (2, 0.5): [0.5, 0.5],
    (2, 1.0): [0.5, 0.5],
    (3, 0.0): [0.75, 0.75, 0.5],
    (3, 0.5): [0.625, 0.625, 0.5],
    (3, 1.0): [0.5, 0.5, 0.5],
    (4, 0.0): [0.875, 0.875, 0.75, 0.5],
    (4, 0.5): [0.6875, 0.6875, 0.625, 0.5],
    (4, 1.0): [0.5, 0.5, 0.5, 0.5],
    (5, 0.0): [0.9375, 0.9375, 0.875, 0.75, 0.5],
    (5, 0.5): [0.71875, 0.71875, 0.6875, 0.625, 0.5],
    (5, 1.0): [0.5, 0.5, 0.5, 0.5, 0.5],
}


@pytest.mark.parametrize(("count", "temperature"), sorted(EXPECTED_P))
def test_calculate_p_matches_seed_table(count: int, temperature: float) -> None:
    got = [calculate_p(i, count, temperature, 0.5) for i in range(1, count + 1)]
    assert got == pytest.approx(EXPECTED_P[(count, temperature)], abs=1e-12)
    # drop_rates lists the same values in listing order (first listed = highest priority)
    assert drop_rates(count, temperature, 0.5) == pytest.approx(got[::-1], abs=1e-12)


def test_calculate_p_single_variant_is_base_droprate() -> None:
    assert calculate_p(1, 1, 0.0, 0.5) == 0.5  # the original returns 2b = 1.0 (drops everything)
    assert calculate_p(1, 1, 0.3, 0.2) == 0.2


def test_uniform_draws_do_not_depend_on_slicing() -> None:
    key = (1, 2, 3, 4)
    whole = uniform_int16(key, 0, 200_000)
    pieces = torch.cat([uniform_int16(key, s, min(s + 7_777, 200_000)) for s in range(0, 200_000, 7_777)])
    assert torch.equal(whole, pieces)
    u = uniform01(key, 0, 200_000)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005


def test_magprune_keep_rate_follows_normalised_magnitude() -> None:
    n = 200_000
    delta = torch.linspace(0.01, 1.0, n)  # smallest first
    pruned = magprune(delta, 0.5, seed=3, name="w", epsilon=0.1, rescale=False)
    kept = pruned != 0
    assert float(kept.float().mean()) == pytest.approx(0.5, abs=0.01)
    low, high = kept[: n // 20].float().mean(), kept[-n // 20 :].float().mean()
    assert float(low) == pytest.approx(0.4525, abs=0.015)  # p_i near p + eps/2 for small |delta|
    assert float(high) == pytest.approx(0.5475, abs=0.015)  # p_i near p - eps/2 for large |delta|
    assert torch.equal(pruned[kept], delta[kept])  # no rescale: survivors unchanged


def test_magprune_rescale_is_unbiased() -> None:
    delta = torch.linspace(-1.0, 1.0, 64)
    draws = torch.stack([magprune(delta, 0.6, seed=s, name="w") for s in range(3000)])
    mean = draws.mean(0)
    # survivor scale 1/(1-p_i) with p_i in [0.55, 0.65]: per-element std of the mean <= ~0.025
    assert torch.allclose(mean, delta, atol=0.1)
    assert float((mean - delta).abs().mean()) < 0.03


def test_magprune_constant_delta_has_no_nan() -> None:
    delta = torch.full((1000,), 0.25)
    pruned = magprune(delta, 0.5, seed=0, name="c")
    assert torch.isfinite(pruned).all()
    kept = pruned[pruned != 0]
    assert torch.allclose(kept, torch.full_like(kept, 0.5))  # 0.25 / (1 - 0.5)
    assert 400 < kept.numel() < 600


def _hand(
    values: list[list[float]], base: list[float] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    base_t = torch.tensor(base if base is not None else [0.0] * len(values[0]))
    return base_t, [base_t + torch.tensor(v) for v in values]


def test_circuit_sign_conflict_overwrites_with_higher_priority() -> None:
    # listing order: v1 (highest priority) first; processing order v3, v2, v1
    base, variants = _hand([[1.0, -1.0, 0.0, 3.0], [-2.0, 2.0, 0.0, 0.0], [4.0, 4.0, 5.0, -6.0]])
    params = CircuitParams(threshold=0.0, drop_rates=(0.0, 0.0, 0.0))
    merged = circuit_merge(base, variants, params, seed=0, name="t")
    # e0: 4 -> -2 (conflict) -> 1 (conflict); e1: 4 -> 3 (agree) -> -1 (conflict); e2: only v3; e3: -6 -> 3
    assert merged.tolist() == pytest.approx([1.0, -1.0, 5.0, 3.0])


@pytest.mark.parametrize(
    ("temperature", "expected"), [(0.0, 2.0), (1.0, 7.0 / 3.0), (0.5, 0.5 * 2.0 + 0.5 * 7.0 / 3.0)]
)
def test_circuit_temperature_blend_on_agreement(temperature: float, expected: float) -> None:
    base, variants = _hand([[1.0], [2.0], [4.0]], base=[10.0])
    params = CircuitParams(temperature=temperature, threshold=0.0, drop_rates=(0.0, 0.0, 0.0))
    merged = circuit_merge(base, variants, params, seed=0, name="t")
    assert float(merged[0]) == pytest.approx(10.0 + expected, abs=1e-5)


def test_circuit_threshold_ignores_tiny_changes() -> None:
    base, variants = _hand([[1e-7, 0.5]], base=[1.0, 1.0])
    merged = circuit_merge(base, variants, CircuitParams(threshold=1e-6, drop_rates=(0.0,)), 0, "t")
    assert merged.tolist() == pytest.approx([1.0, 1.5])


def _random_family(shape: tuple[int, ...], count: int = 3, dtype: torch.dtype = torch.bfloat16):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen)
    variants = [(base + 0.05 * torch.randn(shape, generator=gen)).to(dtype) for _ in range(count)]
    return base.to(dtype), variants


@pytest.mark.parametrize("method", LEGACY_METHODS)
def test_results_do_not_depend_on_chunk_size(method: str) -> None:
    base, variants = _random_family((300, 250))
    reference = merge_tensor(method, base, variants, None, seed=7, name="layer.w")
    for chunk in (1_000, 65_536 + 17, 10_000_000):
        assert torch.equal(
            merge_tensor(method, base, variants, None, 7, "layer.w", chunk_elems=chunk), reference
        )
    assert reference.dtype == torch.bfloat16 and torch.isfinite(reference.float()).all()
    if registered()[method].stochastic:
        assert not torch.equal(merge_tensor(method, base, variants, None, 8, "layer.w"), reference)
        assert not torch.equal(merge_tensor(method, base, variants, None, 7, "layer.v"), reference)


def test_circuit_single_variant_keeps_about_half() -> None:
    base, (variant,) = _random_family((100, 100), count=1, dtype=torch.float32)
    merged = circuit_merge(base, [variant], CircuitParams(), seed=0, name="w")
    changed = float((merged != base).float().mean())
    assert 0.45 < changed < 0.55  # p = base_droprate = 0.5 (the original drops ~95 %)


def test_bad_parameters_and_shapes_raise_input_error() -> None:
    base, variants = _random_family((4, 4), count=2)
    with pytest.raises(InputError, match="temperature"):
        circuit_merge(base, variants, CircuitParams(temperature=1.5), 0, "w")
    with pytest.raises(InputError, match="drop rate"):
        circuit_merge(base, variants, CircuitParams(base_droprate=1.0), 0, "w")
    with pytest.raises(InputError, match="drop_rates"):
        make_params("circuit", {"drop_rates": [0.2, -0.1]})
    with pytest.raises(InputError, match=r"'w'.*variant 2"):
        circuit_merge(base, [variants[0], torch.zeros(4, 5)], CircuitParams(), 0, "w")
    with pytest.raises(InputError, match="density"):
        make_params("della", {"density": 0.0})
    with pytest.raises(InputError, match="unknown parameter"):
        make_params("della", {"temperature": 0.1})


def test_make_params_accepts_seed_yaml_names() -> None:
    params = make_params("circuit", {"meaningful_change_threshold": 1e-6, "skip_rescaling": True})
    assert params == make_params("circuit", {"threshold": 1e-6, "rescale": False})
    assert params["threshold"] == 1e-6 and params["rescale"] is False


def test_della_keep_probability_follows_row_rank() -> None:
    delta = torch.tensor([[0.3, -0.1, 0.2, 0.0, -0.4]])
    probs = keep_probabilities(delta, 0.5, 0.1)
    # ranks by |delta|: 0.0 < 0.1 < 0.2 < 0.3 < 0.4 -> probs 0.4 .. 0.6
    assert probs[0].tolist() == pytest.approx([0.55, 0.45, 0.5, 0.4, 0.6])


def test_della_is_unbiased_without_sign_conflicts() -> None:
    base = torch.zeros(8, 16)
    delta = torch.linspace(0.1, 1.0, 128).reshape(8, 16)
    params = DellaParams(density=0.5, epsilon=0.2, normalize=False)
    mean = torch.stack([della_merge(base, [delta], params, s, "w") for s in range(2000)]).mean(0)
    assert float((mean - delta).abs().mean()) < 0.03


def test_della_sign_election_and_disjoint_mean() -> None:
    base = torch.zeros(3)
    variants = [torch.tensor([1.0, -1.0, -2.0]), torch.tensor([2.0, 3.0, 1.0])]
    merged = della_merge(base, variants, DellaParams(density=1.0), 0, "w")
    # sums [3, 2, -1] -> signs +, +, -; disjoint mean over the agreeing deltas
    assert merged.tolist() == pytest.approx([1.5, 3.0, -2.0])
    scaled = della_merge(base, variants, DellaParams(density=1.0, lambda_=0.5), 0, "w")
    assert scaled.tolist() == pytest.approx([0.75, 1.5, -1.0])


def test_task_arithmetic() -> None:
    base = torch.tensor([1.0, 2.0])
    variants = [torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])]
    params = make_params("task_arithmetic", {"weights": [1.0, 0.5], "lambda": 2.0})
    assert merge_tensor("task_arithmetic", base, variants, params).tolist() == pytest.approx([3.0, 4.0])


@pytest.mark.parametrize("method", LEGACY_METHODS)
def test_inputs_are_not_modified(method: str) -> None:
    base, variants = _random_family((64, 32), dtype=torch.float32)
    copies = [base.clone(), *[v.clone() for v in variants]]
    merge_tensor(method, base, variants, None, 0, "w")
    assert all(torch.equal(a, b) for a, b in zip([base, *variants], copies, strict=True))
