"""Depth fusion maths (seed 003, MKA): fold the last layer into the one before it, step by step.

One step with coefficient ``a`` on a stack of ``n`` layers computes
``W[n-2] <- a * W[n-2] + (1 - a) * W[n-1]`` for every fused tensor and drops layer ``n-1``. After ``k``
steps the surviving layer ``s = L-1-k`` is a combination of the original layers ``s .. L-1``:

    c[s]       = a[k-1]
    c[s+i]     = a[k-1-i] * prod_{j=k-i}^{k-1} (1 - a[j])      for 0 < i < k
    c[L-1]     = prod_{j=0}^{k-1} (1 - a[j])

Layers ``0 .. s-1`` are untouched. The same module holds the MKA similarity maths (diffusion-kernel
embedding, kNN mutual information and entropy, the sigmoid fusion ratio), computed over samples.
Everything here is pure: tensors (or floats) in, tensors (or floats) out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from olmopt.recipe import FusionStep

# ---------------------------------------------------------------------------------------------------
# The fusion chain
# ---------------------------------------------------------------------------------------------------


def check_chain(num_layers: int, num_steps: int) -> None:
    """Raise ``ValueError`` unless ``num_steps`` fusion steps fit a stack of ``num_layers`` layers."""
    if num_layers < 1:
        raise ValueError(f"a model needs at least one layer, got {num_layers}")
    if num_steps < 0 or num_steps > num_layers - 1:
        raise ValueError(
            f"{num_steps} fusion steps do not fit {num_layers} layers (at most {num_layers - 1}: one layer "
            "must stay)"
        )


def fusion_pairs(num_layers: int, num_steps: int) -> list[tuple[int, int]]:
    """(into, remove) of each step: ``(L-2, L-1), (L-3, L-2), ...`` (always the last two layers)."""
    check_chain(num_layers, num_steps)
    return [(num_layers - 2 - i, num_layers - 1 - i) for i in range(num_steps)]


def fusion_steps(num_layers: int, alphas: Sequence[float]) -> list[FusionStep]:
    """The chain's steps for ``alphas`` on a stack of ``num_layers`` layers."""
    pairs = fusion_pairs(num_layers, len(alphas))
    return [FusionStep(into=i, remove=r, alpha=float(a)) for (i, r), a in zip(pairs, alphas, strict=True)]


def tail_coefficients(alphas: torch.Tensor) -> torch.Tensor:
    """Closed-form weights of original layers ``s .. L-1`` in the surviving layer ``s`` (differentiable).

    ``alphas`` is a 1-D tensor of the ``k`` step coefficients in chain order; the result has ``k + 1``
    entries (for ``k = 0`` it is ``[1]``) and sums to one.
    """
    if alphas.dim() != 1:
        raise ValueError(f"alphas must be a 1-D tensor, got shape {tuple(alphas.shape)}")
    k = alphas.shape[0]
    one = torch.ones(1, dtype=alphas.dtype, device=alphas.device)
    if k == 0:
        return one
    chrono = alphas.flip(0)  # chrono[i] = a[k-1-i]: the step that folds original layer s+i+1 in
    keep = 1.0 - chrono
    # survive[i] = prod_{j<i} (1 - chrono[j]): how much of layer s+i is left after the steps above it
    survive = torch.cat([one, torch.cumprod(keep, dim=0)])
    head = torch.cat([chrono, one])
    return survive * head


def fusion_coefficients(num_layers: int, alphas: Sequence[float]) -> dict[int, dict[int, float]]:
    """Surviving layer -> {original layer: coefficient} after the whole chain (closed form)."""
    check_chain(num_layers, len(alphas))
    k = len(alphas)
    survivor = num_layers - 1 - k
    coefficients: dict[int, dict[int, float]] = {i: {i: 1.0} for i in range(survivor)}
    tail = tail_coefficients(torch.tensor([float(a) for a in alphas], dtype=torch.float64))
    coefficients[survivor] = {survivor + i: float(c) for i, c in enumerate(tail.tolist())}
    return coefficients


def fuse_pair(keep: torch.Tensor, drop: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``alpha * keep + (1 - alpha) * drop`` computed in float32, returned in ``keep``'s dtype."""
    if keep.shape != drop.shape:
        raise ValueError(f"cannot fuse tensors of shapes {tuple(keep.shape)} and {tuple(drop.shape)}")
    fused = alpha * keep.float() + (1.0 - alpha) * drop.float()
    return fused.to(keep.dtype)


def fuse_chain(layers: Sequence[torch.Tensor], alphas: Sequence[float]) -> list[torch.Tensor]:
    """The seed's iterative chain on one tensor per layer: fold the last into the one before, repeat."""
    check_chain(len(layers), len(alphas))
    stack = list(layers)
    for alpha in alphas:
        drop = stack.pop()
        stack[-1] = fuse_pair(stack[-1], drop, float(alpha))
    return stack


def fuse_tail(tail: Sequence[torch.Tensor], alphas: torch.Tensor) -> torch.Tensor:
    """The surviving tensor from original tensors ``W[s..L-1]`` in one float32 sum (differentiable).

    ``len(tail)`` must be ``len(alphas) + 1``. The result has the dtype of ``tail[0]``.
    """
    if len(tail) != alphas.shape[0] + 1:
        raise ValueError(
            f"{alphas.shape[0]} fusion steps need {alphas.shape[0] + 1} tensors, got {len(tail)}"
        )
    coefficients = tail_coefficients(alphas.float())
    fused = sum(c * w.float() for c, w in zip(coefficients, tail, strict=True))
    return fused.to(tail[0].dtype)


# ---------------------------------------------------------------------------------------------------
# MKA similarity (Pruning-via-Merging ``pipeline.py``), over samples
# ---------------------------------------------------------------------------------------------------


def diffusion_embedding(
    samples: torch.Tensor, sigma_k: float = 8.0, alpha: float = 0.5, dims: int = 2
) -> torch.Tensor:
    """MKA's ``diffusionKernel``: a ``(N, dims)`` diffusion-map embedding of ``N`` sample vectors.

    ``K = exp(-(D / sigma_k) ** 0.5)`` on pairwise L2 distances (zero diagonal), density-normalised
    twice, then the leading non-trivial singular vectors divided by the first one.
    """
    if samples.dim() != 2:
        raise ValueError(f"samples must be (N, features), got shape {tuple(samples.shape)}")
    n = samples.shape[0]
    if n < dims + 1:
        raise ValueError(
            f"a {dims}-dimensional diffusion embedding needs at least {dims + 1} samples, got {n}"
        )
    x = samples.double()
    distances = torch.cdist(x, x)
    distances.fill_diagonal_(0.0)
    kernel = torch.exp(-((distances / sigma_k) ** 0.5))
    p = kernel.sum(dim=0)
    k1 = kernel / torch.outer(p, p) ** alpha
    v = torch.sqrt(k1.sum(dim=0))
    a = k1 / torch.outer(v, v)
    regulariser = 1e-6
    for _ in range(10):
        if math.isfinite(float(torch.linalg.cond(a))):
            break
        a = a + regulariser * torch.eye(n, dtype=a.dtype)
        regulariser *= 10
    a = torch.nan_to_num(a, nan=0.0)
    a = torch.where(a.abs() < 1e-12, torch.full_like(a, 1e-12), a)
    u, _, _ = torch.linalg.svd(a)
    u = u / u[:, :1]
    return u[:, 1 : dims + 1]


def rank_normalise(embedding: torch.Tensor) -> torch.Tensor:
    """MKA's ``load_embeddings``: NaN -> 0, then each column replaced by its ranks / N."""
    x = torch.nan_to_num(embedding.double(), nan=0.0, posinf=0.0, neginf=0.0)
    ranks = torch.argsort(torch.argsort(x, dim=0, stable=True), dim=0, stable=True)
    return ranks.double() / x.shape[0]


def knn_mutual_information(x: torch.Tensor, y: torch.Tensor, n_neighbors: int = 5) -> float:
    """Kraskov (KSG-1) estimate of I(x; y) for two 1-D samples, clipped at 0 (as scikit-learn's).

    Both variables are scaled to unit standard deviation first; neighbours use the max norm.
    """
    if x.dim() != 1 or x.shape != y.shape:
        raise ValueError("x and y must be 1-D tensors of the same length")
    n = x.shape[0]
    k = min(n_neighbors, n - 1)
    if k < 1:
        raise ValueError(f"mutual information needs at least 2 samples, got {n}")
    xs = _unit_scale(x.double())
    ys = _unit_scale(y.double())
    dx = (xs[:, None] - xs[None, :]).abs()
    dy = (ys[:, None] - ys[None, :]).abs()
    joint = torch.maximum(dx, dy)
    joint.fill_diagonal_(float("inf"))
    radius = torch.kthvalue(joint, k, dim=1).values
    radius = torch.nextafter(radius, torch.zeros_like(radius))
    eye = torch.eye(n, dtype=torch.bool)
    nx = ((dx <= radius[:, None]) & ~eye).sum(dim=1).double()
    ny = ((dy <= radius[:, None]) & ~eye).sum(dim=1).double()
    digamma = torch.special.digamma
    mi = (
        digamma(torch.tensor(float(n), dtype=torch.float64))
        + digamma(torch.tensor(float(k), dtype=torch.float64))
        - digamma(nx + 1).mean()
        - digamma(ny + 1).mean()
    )
    return max(0.0, float(mi))


def _unit_scale(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    return x / std if float(std) > 0 else x


def knn_entropy(points: torch.Tensor, k: int = 50) -> float:
    """MKA's kNN entropy ``-mean(log(k / (N * dist_k ** d)))`` of ``(N, d)`` points (``k`` capped at N-1)."""
    n, d = points.shape
    k = min(k, n - 1)
    if k < 1:
        raise ValueError(f"entropy needs at least 2 samples, got {n}")
    distances = torch.cdist(points.double(), points.double())
    distances.fill_diagonal_(float("inf"))
    dist_k = torch.kthvalue(distances, k, dim=1).values.clamp_min(1e-12)
    return float(-torch.log(k / (n * dist_k**d)).mean())


def layer_similarity(
    embeddings: Sequence[torch.Tensor], n_neighbors: int = 5, k_entropy: int = 50
) -> torch.Tensor:
    """MKA's ``compute_similarity_matrix_npib_global``: ``sim[i, j] = MI(i, j) / sqrt(H_i H_j)``.

    ``MI(i, j)`` is the mean over every column pair of the rank-normalised embeddings ``i`` and ``j``.
    The entropies are taken by absolute value and a non-finite ratio counts as 0 (the seed's formula
    can multiply entropies of opposite signs).
    """
    count = len(embeddings)
    entropy = torch.tensor([abs(knn_entropy(e, k_entropy)) for e in embeddings], dtype=torch.float64)
    sim = torch.zeros(count, count, dtype=torch.float64)
    for i in range(count):
        for j in range(i, count):
            mi = sum(
                knn_mutual_information(embeddings[i][:, a], embeddings[j][:, b], n_neighbors)
                for a in range(embeddings[i].shape[1])
                for b in range(embeddings[j].shape[1])
            ) / (embeddings[i].shape[1] * embeddings[j].shape[1])
            ratio = mi / math.sqrt(float(entropy[i] * entropy[j])) if entropy[i] * entropy[j] > 0 else 0.0
            sim[i, j] = sim[j, i] = ratio if math.isfinite(ratio) else 0.0
    return sim


def fusion_ratio(similarity: torch.Tensor, keep: int, drop: int, beta: float = 1.0) -> float:
    """MKA's ``compute_fusion_ratios``: ``sigmoid(beta * s_keep / (s_keep + s_drop))``, s = row mean."""
    s_keep = float(similarity[keep].mean())
    s_drop = float(similarity[drop].mean())
    total = s_keep + s_drop
    share = s_keep / total if total > 0 else 0.5
    return 1.0 / (1.0 + math.exp(-beta * share))
