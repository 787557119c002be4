"""Data-flow-space (DFS) maths: mask decoding, validation against a pool, the transforms and the exact folds.

Pure: tensors in, tensors out; no model objects, no Optuna, no file I/O. The path type is
``olmopt.methods.dfs.path``; running a path is ``executor``, exporting it ``folded_model``; the
semantics and the fold derivation are in docs/dfs.md.

Transform of hop ``k`` (``scale_target="branch"``, the seed's semantics)::

    T_k(v) = s_k * (W_k @ v) + b_k      (W_k = identity and b_k = 0 when absent)

applied to the *branch output* entering hop ``k``: the embedding at hop 0, else the MLP output of hop
``k-1`` (before it is added to the residual stream). ``scale_target="stream"`` instead multiplies the
whole residual stream entering hop ``k`` by ``s_k`` (scalar scales only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from olmopt.errors import InputError
from olmopt.methods.dfs.path import NEUTRAL_SCALE, DfsPath, HopAffine, ScaleTarget, finite_number


def as_layer_mask(mask: Any) -> np.ndarray:
    """A boolean (repetitions, models, layers) array; anything else is an InputError."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    try:
        array = np.asarray(mask)
    except ValueError:
        array = None
    if array is None or array.dtype == object:
        raise InputError("layer_mask must be a rectangular (repetitions, models, layers) array of booleans")
    if array.ndim != 3:
        raise InputError(
            f"layer_mask must have 3 dimensions (repetitions, models, layers), got shape {array.shape}"
        )
    if array.dtype != np.bool_:
        if array.size and not np.isin(array, (0, 1)).all():
            raise InputError("layer_mask must hold booleans (true/false or 0/1)")
        array = array.astype(bool)
    return array


def path_from_mask(
    mask: Any,
    scales: Any = None,
    *,
    affine: Sequence[HopAffine | None] | None = None,
    input_model: int = 0,
    output_model: int = 0,
    layer_counts: Sequence[int] | None = None,
    append_last_layer: bool = False,
    last_layer_scale: float = NEUTRAL_SCALE,
    scale_target: ScaleTarget = "branch",
) -> DfsPath:
    """Decode a layer mask of shape ``(repetitions, models, layers)`` into a ``DfsPath``.

    Hop order is the seed's: repetition-major, then model, then layer ascending. ``scales`` is
    ``None`` (all 1), one number per active slot (hop order), or an array of the mask's shape whose
    inactive slots hold 1.0 (a different value there is an error: it would have no effect).
    ``affine`` has one entry per active slot. ``layer_counts`` (layers per model), when given, checks
    the model axis and that no slot past a model's depth is active. ``append_last_layer`` adds the
    seed's final hop ``(output_model, last layer)`` with ``last_layer_scale`` and no affine map.
    """
    array = as_layer_mask(mask)
    repetitions, num_models, width = array.shape
    if layer_counts is not None:
        if num_models != len(layer_counts):
            raise InputError(f"layer_mask covers {num_models} models but the pool has {len(layer_counts)}")
        if width != max(layer_counts):
            raise InputError(
                f"layer_mask has {width} layer slots but the deepest model has {max(layer_counts)} layers"
            )
        for m, count in enumerate(layer_counts):
            beyond = np.argwhere(array[:, m, count:])
            if beyond.size:
                r, l_ = int(beyond[0][0]), int(beyond[0][1]) + count
                raise InputError(
                    f"layer_mask[{r}][{m}][{l_}] is active but model {m} has only {count} layers"
                )
    active = [tuple(int(i) for i in idx) for idx in np.argwhere(array)]  # C order = hop order
    hop_scales = _decode_scales(scales, array, len(active))
    hop_affine = list(affine) if affine is not None else []
    if hop_affine and len(hop_affine) != len(active):
        raise InputError(
            f"affine has {len(hop_affine)} entries but layer_mask has {len(active)} active slots"
        )
    hops = [(m, l_) for _, m, l_ in active]
    if append_last_layer:
        if layer_counts is None:
            raise InputError("append_last_layer needs layer_counts (the output model's depth)")
        hops.append((output_model, layer_counts[output_model] - 1))
        hop_scales.append(finite_number(last_layer_scale, "last_layer_scale"))
        if hop_affine:
            hop_affine.append(None)
    if not hops:
        raise InputError("layer_mask selects no layer: the DFS path is empty")
    del repetitions
    return DfsPath(
        hops=tuple(hops),
        scales=tuple(hop_scales),
        affine=tuple(hop_affine),
        input_model=input_model,
        output_model=output_model,
        scale_target=scale_target,
    )


def _decode_scales(scales: Any, mask: np.ndarray, n_active: int) -> list[float]:
    if scales is None:
        return [NEUTRAL_SCALE] * n_active
    if isinstance(scales, torch.Tensor):
        scales = scales.detach().cpu().numpy()
    try:
        array = np.asarray(scales, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(
            "scaling_factors must be one number per active slot or an array shaped like layer_mask"
        ) from None
    if array.shape == mask.shape:
        inactive = np.argwhere(~mask & (array != NEUTRAL_SCALE))
        if inactive.size:
            r, m, l_ = (int(i) for i in inactive[0])
            raise InputError(
                f"scaling_factors[{r}][{m}][{l_}] = {array[r, m, l_]:g} is set for an inactive layer_mask "
                "slot (inactive slots must hold 1.0)"
            )
        values = array[mask]
    elif array.ndim == 1 and array.shape[0] == n_active:
        values = array
    else:
        raise InputError(
            f"scaling_factors has shape {array.shape}; expected {mask.shape} (like layer_mask) "
            f"or ({n_active},) (one per active slot)"
        )
    return [finite_number(float(v), f"scaling_factors (hop {k})") for k, v in enumerate(values)]


def validate_path(
    path: DfsPath, layer_counts: Sequence[int], hidden_sizes: Sequence[int] | None = None
) -> None:
    """Check a path against a pool: model and layer indices in range, one hidden size, affine sizes."""
    n = len(layer_counts)
    for what, m in (("input_model", path.input_index), ("output_model", path.output_index)):
        if m >= n:
            raise InputError(f"{what} = {m} but the pool has {n} models")
    for k, (m, l_) in enumerate(path.hop_indices):
        if m >= n:
            raise InputError(f"hop {k} uses model {m} but the pool has {n} models")
        if l_ >= layer_counts[m]:
            raise InputError(f"hop {k} uses layer {l_} of model {m}, which has {layer_counts[m]} layers")
    if hidden_sizes is None:
        return
    used = sorted({m for m, _ in path.hop_indices} | {path.input_index, path.output_index})
    sizes = {m: hidden_sizes[m] for m in used}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"model {m}: {h}" for m, h in sizes.items())
        raise InputError(f"models on a DFS path must share one hidden size ({detail})")
    hidden = next(iter(sizes.values()))
    for k in range(path.num_hops):
        a = path.affine_at(k)
        if a is not None and a.size != hidden:
            raise InputError(f"hop {k}: affine map is {a.size}-dimensional but the hidden size is {hidden}")


def apply_transform(value: torch.Tensor, scale: float, affine: HopAffine | None) -> torch.Tensor:
    """``T(v) = scale * (W @ v) + b`` on the last dimension (W, b from ``affine``, when given)."""
    if affine is None:
        return affine_transform(value, scale)
    return affine_transform(value, scale, affine.weight, affine.bias)


def affine_transform(
    value: torch.Tensor, scale: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * (weight @ v) + bias`` on the last dimension of ``value`` (absent parts are skipped)."""
    if weight is not None:
        value = value @ weight.to(device=value.device, dtype=value.dtype).T
    if scale != NEUTRAL_SCALE:
        value = value * scale
    if bias is not None:
        value = value + bias.to(device=value.device, dtype=value.dtype)
    return value


def fold_into_embedding(embedding: torch.Tensor, scale: float, affine: HopAffine | None) -> torch.Tensor:
    """The embedding table whose rows are ``T_0`` of the original rows (exact: a lookup is linear)."""
    out = apply_transform(embedding.double(), scale, affine)
    return out.to(embedding.dtype)


def fold_into_output_projection(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: float, affine: HopAffine | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold ``T`` into a linear layer ``y = D x + d`` that produces the branch: ``T(y) = D' x + d'``.

    ``D' = s * W @ D`` and ``d' = s * W @ d + b``. The bias is ``None`` when neither ``d`` nor ``b``
    exists (so the result needs no bias parameter).
    """
    folded_w = weight.double()
    if affine is not None and affine.weight is not None:
        folded_w = affine.weight.double() @ folded_w
    if scale != NEUTRAL_SCALE:
        folded_w = folded_w * scale
    folded_b: torch.Tensor | None = None
    if bias is not None:
        folded_b = apply_transform(bias.double(), scale, affine)
    elif affine is not None and affine.bias is not None:
        folded_b = affine.bias.double().clone()
    return folded_w.to(weight.dtype), None if folded_b is None else folded_b.to(weight.dtype)


def stream_ratios(scales: Sequence[float]) -> list[float]:
    """Cumulative factors ``r_k = s_1 * ... * s_k`` (``r_0 = 1``) for ``scale_target="stream"``.

    With the embedding scaled by ``s_0``, the residual stream entering hop ``k`` of the scaled path is
    ``r_k`` times the stream of a plain stack whose hop-``k`` layer has its ``o_proj`` and
    ``down_proj`` divided by ``r_k``, up to RMSNorm's eps (see ``stream_equivalent_eps``).
    """
    ratios = [1.0]
    for s in scales[1:]:
        ratios.append(ratios[-1] * float(s))
    return ratios


def stream_equivalent_eps(eps: float, ratio: float) -> float:
    """RMSNorm(r x; eps) == RMSNorm(x; eps / r**2) for r > 0: the eps the folded stack would need."""
    return eps / (ratio * ratio)


def rms_norm_fold_error_bound(eps: float, ratio: float, mean_square: float) -> float:
    """Relative error of a norm when the folded stack keeps ``eps`` instead of ``eps / r**2``.

    ``|sqrt((ms + eps/r^2) / (ms + eps)) - 1|`` for an input of mean square ``ms`` (folded scale).
    """
    return abs(math.sqrt((mean_square + eps / ratio**2) / (mean_square + eps)) - 1.0)
