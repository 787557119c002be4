"""Circuit-Merge! (task-vector merge with priority drop rates, MAGPRUNE and sign-conflict overwrite).

Follows ``jsgreenawalt/ml-model-mergetools/circuit-merge.py`` with its defects fixed (see
docs/circuit.md, "Divergences"). Variants are listed highest priority first; they are processed from
the last-listed (lowest priority, i=1) to the first-listed (highest priority, i=count).

Per element and variant: ``delta = variant - base``; ``|delta| < threshold`` counts as no change;
MAGPRUNE drops the element with probability ``p_i = p - eps/2 + eps * (1 - (|delta|-g_min)/(g_max-g_min))``
(``g_min``/``g_max`` over the whole tensor) and rescales survivors by ``1/(1-p_i)``; then the first
contribution is taken as is, a sign conflict overwrites, and agreement blends
``(1-T)*(acc+delta)/2 + T*running_mean``. The result is ``base + acc`` in the base dtype.

The inner loop is written with float arithmetic only (no ``torch.where`` or bool masks, which run
5-20x slower on CPU) over bounded float32 chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from olmopt.errors import InputError
from olmopt.methods.delta._kernels import check_shapes
from olmopt.methods.delta.seeded_uniform import INT16_OFFSET, LEVELS, stream_key, uniform_int16

DEFAULT_CHUNK_ELEMS = 1 << 18
MAGPRUNE_EPSILON = 0.1


@dataclass(frozen=True)
class CircuitParams:
    """Circuit-Merge knobs (defaults as the original script)."""

    temperature: float = 0.0
    base_droprate: float = 0.5
    threshold: float = 2e-6
    epsilon: float = MAGPRUNE_EPSILON
    rescale: bool = True
    drop_rates: tuple[float, ...] | None = None  # per variant (listing order); overrides calculate_p

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 1.0:
            raise InputError(f"circuit: temperature must be in [0, 1], got {self.temperature}")
        if not 0.0 <= self.base_droprate < 1.0:
            raise InputError(f"circuit: base drop rate must be in [0, 1), got {self.base_droprate}")
        if not self.threshold >= 0.0:
            raise InputError(f"circuit: threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.epsilon < 1.0:
            raise InputError(f"circuit: epsilon must be in [0, 1), got {self.epsilon}")
        for rate in self.drop_rates or ():
            if not 0.0 <= rate < 1.0:
                raise InputError(f"circuit: drop rate must be in [0, 1), got {rate}")

    def rates(self, count: int) -> list[float]:
        """Drop rate per variant in listing order (explicit ``drop_rates`` or ``calculate_p``)."""
        if self.drop_rates is None:
            return drop_rates(count, self.temperature, self.base_droprate)
        if len(self.drop_rates) != count:
            raise InputError(f"circuit: {len(self.drop_rates)} drop rates for {count} variants")
        return list(self.drop_rates)


def calculate_p(i: int, count: int, temperature: float = 0.0, base_droprate: float = 0.5) -> float:
    """Drop rate of the variant processed ``i``-th (1 = lowest priority, ``count`` = highest).

    The highest-priority variant gets ``base_droprate``; each step down halves the keep rate, except
    that the two lowest share one; ``temperature`` blends towards a flat ``base_droprate``. With one
    variant the rate is ``base_droprate`` (the original returns ``2*base_droprate``, i.e. 1.0).
    """
    if count < 1 or not 1 <= i <= count:
        raise InputError(f"calculate_p: need 1 <= i <= count, got i={i}, count={count}")
    if count == 1:
        return base_droprate
    divisions = count - max(i, 2) + 1
    keep = 0.5**divisions * 2.0 * (1.0 - base_droprate)
    keep = (1.0 - temperature) * keep + temperature * (1.0 - base_droprate)
    return 1.0 - keep


def drop_rates(count: int, temperature: float = 0.0, base_droprate: float = 0.5) -> list[float]:
    """Drop rates for variants in listing order (first listed = highest priority)."""
    return [calculate_p(count - j, count, temperature, base_droprate) for j in range(count)]


def _effective_epsilon(p: float, epsilon: float) -> float:
    """Narrow the MAGPRUNE spread near the ends so every ``p_i`` stays in ``[0, 1)``."""
    return max(0.0, min(epsilon, 2.0 * p, 1.0 - p))


@dataclass(frozen=True)
class _Pruner:
    """MAGPRUNE of one (tensor, variant): ``p_i = intercept - slope * |delta|``, survivors / (1 - p_i)."""

    intercept: float
    slope: float
    threshold: float
    rescale: bool
    key: tuple[int, ...]
    skip: bool  # no element survives the threshold

    @classmethod
    def build(
        cls, p: float, epsilon: float, g_min: float, g_max: float, params: CircuitParams, key: tuple[int, ...]
    ) -> _Pruner:
        threshold = params.threshold
        # The original zeroes |delta| < threshold first, so zeros count towards g_min.
        if g_min < threshold:
            g_min = 0.0
        eps = _effective_epsilon(p, epsilon)
        span = g_max - g_min
        if eps == 0.0 or span <= 0.0:  # constant |delta|: every element gets p (the original gives NaN)
            intercept, slope = p, 0.0
        else:
            # p_i = p - eps/2 + eps * (1 - (|d| - g_min) / span) = intercept - slope * |d|
            slope = eps / span
            intercept = p + eps / 2.0 + slope * g_min
        return cls(intercept, slope, threshold, params.rescale, key, skip=g_max < threshold or g_max == 0.0)

    def prune(self, delta: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pruned, rescaled delta and the float keep mask (1 kept, 0 dropped or below threshold)."""
        magnitude = delta.abs()
        draws = uniform_int16(self.key, start, start + delta.numel()).to(torch.float32)
        # keep iff u >= p_i with u = (draw + 32768.5) / 65536, folded into one affine test
        score = torch.add(draws, magnitude, alpha=LEVELS * self.slope)
        score.sub_(LEVELS * self.intercept - INT16_OFFSET - 0.5)
        keep = score.sign_().clamp_(min=0.0)
        if self.threshold > 0.0:
            # 1 where |delta| >= threshold: sign in {-1, 0, 1} -> {0, 1, 1}
            keep.mul_(magnitude.sub(self.threshold).sign_().add_(1.0).clamp_(max=1.0))
        else:
            keep.mul_(magnitude.sign())
        pruned = delta.mul(keep)
        if self.rescale:
            pruned.div_(magnitude.mul_(self.slope).add_(1.0 - self.intercept))
        return pruned, keep


def _magnitude_range(base: torch.Tensor, variant: torch.Tensor, chunk: int) -> tuple[float, float]:
    g_min, g_max = float("inf"), 0.0
    for start in range(0, base.numel(), chunk):
        stop = start + chunk
        delta = variant[start:stop].to(torch.float32, copy=True).sub_(base[start:stop].float()).abs_()
        low, high = torch.aminmax(delta)
        g_min, g_max = min(g_min, float(low)), max(g_max, float(high))
    return g_min, g_max


def magprune(
    delta: torch.Tensor,
    p: float,
    *,
    seed: int = 0,
    name: str = "",
    epsilon: float = MAGPRUNE_EPSILON,
    threshold: float = 0.0,
    rescale: bool = True,
) -> torch.Tensor:
    """MAGPRUNE one delta tensor (float32 out): drop with ``p_i`` by normalised magnitude, rescale."""
    if not 0.0 <= p < 1.0:
        raise InputError(f"magprune {name!r}: drop rate must be in [0, 1), got {p}")
    flat = delta.reshape(-1).float()
    if flat.numel() == 0:
        return flat.reshape(delta.shape)
    low, high = torch.aminmax(flat.abs())
    params = CircuitParams(threshold=threshold, rescale=rescale)
    pruner = _Pruner.build(p, epsilon, float(low), float(high), params, stream_key(seed, name, 0))
    if pruner.skip:
        return torch.zeros_like(flat).reshape(delta.shape)
    pruned, _ = pruner.prune(flat, 0)
    return pruned.reshape(delta.shape)


def circuit_merge(
    base: torch.Tensor,
    variants: list[torch.Tensor],
    params: CircuitParams,
    seed: int,
    name: str,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
) -> torch.Tensor:
    """Circuit-merge one tensor; ``variants`` are listed highest priority first. Output in base dtype."""
    params.validate()
    check_shapes(base, variants, name)
    count = len(variants)
    rates = params.rates(count)
    flat_base = base.reshape(-1)
    flats = [v.reshape(-1) for v in variants]
    chunk = max(1, int(chunk_elems))
    pruners: list[tuple[int, _Pruner]] = []
    for index in reversed(range(count)):  # lowest priority first
        g_min, g_max = _magnitude_range(flat_base, flats[index], chunk)
        pruner = _Pruner.build(
            rates[index], params.epsilon, g_min, g_max, params, stream_key(seed, name, index)
        )
        if not pruner.skip:
            pruners.append((index, pruner))
    if not pruners:
        return base.clone()
    out = torch.empty_like(flat_base)
    temperature = params.temperature
    for start in range(0, flat_base.numel(), chunk):
        stop = start + chunk
        base32 = flat_base[start:stop].to(torch.float32, copy=True)
        acc = torch.zeros_like(base32)
        contributions = torch.zeros_like(base32) if temperature > 0.0 else None
        for index, pruner in pruners:
            delta = flats[index][start:stop].to(torch.float32, copy=True).sub_(base32)
            pruned, keep = pruner.prune(delta, start)
            agree = acc.mul(pruned).sign_().clamp_(min=0.0)  # 1 where both nonzero with the same sign
            if contributions is None:
                # weight of the new delta: 1 first/conflict, 1/2 on agreement, 0 when dropped
                weight = keep.sub_(agree, alpha=0.5)
            else:
                # count: agree -> count+1, first/conflict -> 1, dropped -> unchanged
                contributions.add_(keep.mul(contributions.mul(agree).add_(1.0).sub_(contributions)))
                blend = torch.reciprocal(contributions.clamp(min=1.0)).mul_(temperature)
                blend.add_((1.0 - temperature) / 2.0)
                # weight: keep * (1 - agree) + agree * ((1-T)/2 + T/count)
                weight = keep.sub_(agree).add_(agree.mul_(blend))
            acc.addcmul_(weight, pruned.sub_(acc))
        out[start:stop] = base32.add_(acc)
    return out.reshape(base.shape)
