"""OLM's two evolution strategies as pure, replayable steps: SVD-ES and norm-ES.

A step is ``(W, sigma, seed) -> offspring``. The noise ``delta ~ N(0, 1) * sigma`` is drawn from a CPU
``torch.Generator`` seeded with ``seed``, so it never depends on the device; the rest (SVD, matmuls) runs
in float32 on W's device. Replaying a step on the same device type (same torch build, same thread
count on CPU) reproduces the offspring bit for bit. Tensors with more than 2 dims are treated as
``[shape[0], -1]`` matrices. Divergences from OLM: docs/selection.md ("Evolution-strategy operators").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from olmopt.errors import InputError

if TYPE_CHECKING:
    from olmopt.recipe import EsStep

EPS = 1e-10
NOISE_CLAMP = 3.0
SVD_ACCEPT_FACTOR = 0.8
NORM_ES_DECAY = 0.9
MAX_SEED = 2**63 - 1


def es_population_size(d: int) -> int:
    """Offspring per generation ``max(4, int(4 + 3 ln d))`` (the CMA-ES default population size)."""
    if d < 1:
        raise ValueError(f"es_population_size: d must be >= 1, got {d}")
    return max(4, int(4 + 3 * math.log(d)))


def es_applicable(W: Tensor) -> bool:
    """True for floating tensors with at least 2 dims and no dim of size 1 (what OLM's ES accepts)."""
    return W.is_floating_point() and W.dim() >= 2 and all(s > 1 for s in W.shape)


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be > 0 and finite, got {sigma!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"ES seed must be an integer in [0, 2**63 - 1], got {seed!r}")


def _as_matrix(W: Tensor) -> Tensor:
    return W.detach().reshape(W.shape[0], -1).float()


def _normal(n: int, sigma: float, seed: int, device: torch.device) -> Tensor:
    """``n`` draws of ``N(0, 1) * sigma`` from a CPU generator seeded with ``seed``, moved to ``device``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(n, generator=generator, dtype=torch.float32) * sigma).to(device)


# --------------------------------------------------------------------------------------------- SVD-ES


@dataclass(frozen=True, eq=False)
class SvdBasis:
    """Thin SVD of the max-abs-normalised matrix of a tensor, numerically null directions dropped."""

    U: Tensor
    S: Tensor
    Vh: Tensor


def svd_basis(W: Tensor) -> SvdBasis | None:
    """SVD of ``W / max|W|`` in float32 on W's device; None when ES does not apply or the SVD fails.

    Keeps singular values above the numerical-rank tolerance ``max(EPS, s_max * max(m, n) * eps32)``
    (OLM's absolute 1e-10 keeps float32 round-off directions, which the inverse damping then boosts).
    None for non-float, 1-D or size-1 shapes, all-zero (``max|W| <= EPS``) or non-finite tensors,
    a numerical failure, or no singular value kept.
    """
    if not es_applicable(W):
        return None
    A = _as_matrix(W)
    if not bool(torch.isfinite(A).all()):
        return None
    peak = A.abs().max()
    if float(peak) <= EPS:
        return None
    try:
        U, S, Vh = torch.linalg.svd(A / peak, full_matrices=False)
    except RuntimeError:
        return None
    if not bool(torch.isfinite(S).all()):
        return None
    tolerance = max(EPS, float(S.max()) * max(A.shape) * torch.finfo(torch.float32).eps)
    keep = S.gt(tolerance)
    if not bool(keep.any()):
        return None
    return SvdBasis(U=U[:, keep], S=S[keep], Vh=Vh[keep, :])


def svd_damping(S: Tensor) -> Tensor:
    """Inverse damping ``sqrt(max|S| / (|S| + EPS))`` normalised to mean 1: small values move more."""
    s = S.abs().float()
    peak = s.max()
    if float(peak) <= EPS:
        return torch.ones_like(s)
    scale = torch.sqrt(peak / (s + EPS))
    return scale / scale.mean()


def svd_noise(
    shape: torch.Size | tuple[int, ...], basis: SvdBasis, delta: Tensor, clamp: float = NOISE_CLAMP
) -> tuple[Tensor, Tensor]:
    """``(mult, add)``: ``add = clamp(U diag(delta * damping)
    Vh)`` reshaped to ``shape``; ``mult = exp(add)``."""
    if delta.shape != basis.S.shape:
        raise ValueError(f"svd_noise: delta {tuple(delta.shape)} vs {basis.S.numel()} singular values")
    coeffs = delta.to(device=basis.S.device, dtype=torch.float32) * svd_damping(basis.S)
    add = ((basis.U * coeffs) @ basis.Vh).reshape(shape).clamp(-clamp, clamp)
    return torch.exp(add), add


def _finite_or_none(out: Tensor) -> Tensor | None:
    return out if bool(torch.isfinite(out).all()) else None


def svd_es_step(W: Tensor, sigma: float, seed: int, basis: SvdBasis | None = None) -> Tensor | None:
    """One SVD-ES offspring ``W * exp(clamp(U diag(delta * damping) Vh))``, ``delta ~ N(0,1) * sigma``.

    ``basis`` may be passed to reuse ``svd_basis(W)`` across the offspring of one generation; it must be
    the basis of this very ``W``. Returns the offspring in W's dtype and device, or None when the step
    does not apply or yields NaN/inf.
    """
    _check_sigma(sigma)
    _check_seed(seed)
    basis = basis if basis is not None else svd_basis(W)
    if basis is None:
        return None
    delta = _normal(basis.S.numel(), float(sigma), seed, basis.S.device)
    mult, _ = svd_noise(W.shape, basis, delta)
    out = (W.detach().float() * mult.to(W.device)).to(W.dtype)
    return _finite_or_none(out)


def _spread(basis: SvdBasis) -> float:
    """``max(std(S), EPS)`` with the unbiased std; a single singular value has no spread (EPS)."""
    std = float(basis.S.std()) if basis.S.numel() > 1 else 0.0
    return max(std, EPS)


def svd_initial_sigma(W: Tensor, initial_sigma: float, basis: SvdBasis | None = None) -> float | None:
    """The first generation's sigma ``initial_sigma * max(std(S), EPS)``; None when SVD-ES does not apply."""
    _check_sigma(initial_sigma)
    basis = basis if basis is not None else svd_basis(W)
    return None if basis is None else initial_sigma * _spread(basis)


def svd_sigma_after_acceptance(
    W_new: Tensor, initial_sigma: float, basis: SvdBasis | None = None
) -> float | None:
    """Sigma after an accepted offspring: ``0.8 * initial_sigma * max(std(S_new), EPS)`` (not compounded)."""
    _check_sigma(initial_sigma)
    basis = basis if basis is not None else svd_basis(W_new)
    return None if basis is None else SVD_ACCEPT_FACTOR * initial_sigma * _spread(basis)


# -------------------------------------------------------------------------------------------- norm-ES


def norm_es_step(W: Tensor, sigma: float, seed: int) -> Tensor | None:
    """One norm-ES offspring: row directions kept, log row norms perturbed by ``N(0,1) * sigma``.

    With ``m`` the row L2 norms and ``D = W / (m + EPS)``: ``D * exp(log(m + EPS) + z)``, one ``z`` per
    row. Returns W's dtype and device, or None when not applicable or not finite.
    """
    _check_sigma(sigma)
    _check_seed(seed)
    if not es_applicable(W):
        return None
    A = _as_matrix(W)
    norms = torch.linalg.vector_norm(A, dim=1, keepdim=True)
    directions = A / (norms + EPS)
    z = _normal(A.shape[0], float(sigma), seed, A.device).unsqueeze(1)
    out = (directions * torch.exp(torch.log(norms + EPS) + z)).reshape(W.shape).to(W.dtype)
    return _finite_or_none(out)


def norm_es_decay(sigma: float) -> float:
    """Norm-ES sigma after an accepted offspring: ``sigma * 0.9``."""
    _check_sigma(sigma)
    return sigma * NORM_ES_DECAY


def apply_es_steps(tensor: Tensor, steps: Sequence[EsStep]) -> Tensor:
    """Replay a Recipe's ES steps on a tensor (each step regenerates its noise from its seed)."""
    for step in steps:
        fn = svd_es_step if step.kind == "svd" else norm_es_step
        out = fn(tensor, step.sigma, step.seed)
        if out is None:
            raise InputError(
                f"recipe: ES step on {step.unit} (seed {step.seed}) is not applicable to this tensor"
            )
        tensor = out
    return tensor
