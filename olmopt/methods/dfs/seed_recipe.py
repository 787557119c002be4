"""The DFS seed's YAML recipe (``model_paths``, ``layer_mask``, scales, biases): read safely, made a path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from olmopt.errors import InputError
from olmopt.methods.dfs.maths import as_layer_mask, path_from_mask
from olmopt.methods.dfs.path import DfsPath, HopAffine
from olmopt.textio import read_text


class SeedRecipeLoader(yaml.SafeLoader):
    """SafeLoader plus exactly two python tags of the seed's files: OrderedDict (as dict) and tuple."""


def _construct_ordered_dict(loader: yaml.SafeLoader, node: yaml.Node) -> dict[Any, Any]:
    if isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    elif isinstance(node, yaml.MappingNode):
        args = loader.construct_mapping(node, deep=True).get("args", [])
    else:
        args = []
    pairs = args[0] if args else []
    try:
        return {key: value for key, value in pairs}  # noqa: C416 - pairs may be lists
    except (TypeError, ValueError):
        raise yaml.constructor.ConstructorError(
            None, None, "OrderedDict arguments must be a list of [key, value] pairs", node.start_mark
        ) from None


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
    return tuple(loader.construct_sequence(node, deep=True))


SeedRecipeLoader.add_constructor(
    "tag:yaml.org,2002:python/object/apply:collections.OrderedDict", _construct_ordered_dict
)
SeedRecipeLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)

_RECIPE_KEYS = frozenset(
    {
        "model_paths",
        "num_r",
        "layer_mask",
        "scaling_factors",
        "bias_factors",
        "input_layer_model",
        "output_layer_model",
        "add_last_layer",
        "last_layer_scale",
        "classification",
        "scale_target",
    }
)


@dataclass(frozen=True)
class DfsRecipe:
    """A DFS recipe as the seed's YAML states it, before the pool's depths are known."""

    models: tuple[tuple[str, str | None], ...]
    mask: np.ndarray
    scaling_factors: Any
    bias_factors: Any
    input_model: int
    output_model: int
    add_last_layer: bool
    last_layer_scale: float
    classification: bool
    scale_target: str

    def to_path(self, layer_counts: Sequence[int], hidden_size: int) -> DfsPath:
        """Decode into a ``DfsPath``; scalar or (H, H) matrix scales, scalar or (H,) biases per slot."""
        scales = np.asarray(
            self.scaling_factors if self.scaling_factors is not None else 1.0, dtype=np.float64
        )
        if scales.ndim == 0:
            scales = np.full(self.mask.shape, float(scales))
        biases = np.asarray(self.bias_factors if self.bias_factors is not None else 0.0, dtype=np.float64)
        if biases.ndim == 0:
            biases = np.full(self.mask.shape, float(biases))
        shape = self.mask.shape
        if scales.shape not in (shape, (*shape, hidden_size, hidden_size)):
            raise InputError(
                f"scaling_factors has shape {scales.shape}; expected {shape} (scalars) or "
                f"{(*shape, hidden_size, hidden_size)} (one matrix per slot)"
            )
        if biases.shape not in (shape, (*shape, hidden_size)):
            raise InputError(
                f"bias_factors has shape {biases.shape}; expected {shape} (scalars) or "
                f"{(*shape, hidden_size)}"
            )
        if biases.shape == shape:
            biases = np.repeat(biases[..., None], hidden_size, axis=-1)
        matrices = scales.ndim == 5
        identity = np.eye(hidden_size)
        for idx in np.argwhere(~self.mask):
            r, m, l_ = (int(i) for i in idx)
            neutral_scale = (
                np.array_equal(scales[r, m, l_], identity) if matrices else scales[r, m, l_] == 1.0
            )
            if not neutral_scale or biases[r, m, l_].any():
                raise InputError(
                    f"scaling_factors/bias_factors[{r}][{m}][{l_}] is set for an inactive layer_mask slot "
                    "(inactive slots must hold 1.0 / identity and bias 0)"
                )
        hop_scales: list[float] = []
        affine: list[HopAffine | None] = []
        for idx in np.argwhere(self.mask):
            r, m, l_ = (int(i) for i in idx)
            bias = biases[r, m, l_]
            bias_tensor = torch.tensor(bias, dtype=torch.float32) if bias.any() else None
            if matrices:
                hop_scales.append(1.0)
                weight = torch.tensor(scales[r, m, l_], dtype=torch.float32)
                affine.append(HopAffine(weight=weight, bias=bias_tensor))
            else:
                hop_scales.append(float(scales[r, m, l_]))
                affine.append(None if bias_tensor is None else HopAffine(bias=bias_tensor))
        return path_from_mask(
            self.mask,
            hop_scales,
            affine=affine if any(a is not None for a in affine) else None,
            input_model=self.input_model,
            output_model=self.output_model,
            layer_counts=layer_counts,
            append_last_layer=self.add_last_layer,
            last_layer_scale=self.last_layer_scale,
            scale_target=self.scale_target,  # type: ignore[arg-type]
        )


def load_dfs_recipe(file: str | Path) -> DfsRecipe:
    """Read a DFS recipe (the seed's YAML layout, python tags included) without running any code."""
    file = Path(file)
    text = read_text(file)
    try:
        data = yaml.load(text, Loader=SeedRecipeLoader)  # noqa: S506 - SafeLoader subclass, two tags only
    except yaml.YAMLError as exc:
        reason = _yaml_reason(exc)
        raise InputError(f"{file}: not a valid recipe YAML: {reason}") from None
    try:
        return _recipe_from_dict(data)
    except InputError as exc:
        raise InputError(f"{file}: {exc}") from None


def _yaml_reason(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def _recipe_from_dict(data: Any) -> DfsRecipe:
    if not isinstance(data, dict):
        raise InputError("a DFS recipe must be a mapping with model_paths and layer_mask")
    unknown = set(data) - _RECIPE_KEYS
    if unknown:
        raise InputError(f"unknown key(s) {sorted(map(str, unknown))}; known: {sorted(_RECIPE_KEYS)}")
    for key in ("model_paths", "layer_mask"):
        if key not in data:
            raise InputError(f"missing key '{key}'")
    models = _model_refs(data["model_paths"])
    mask = as_layer_mask(data["layer_mask"])
    if mask.shape[1] != len(models):
        raise InputError(f"layer_mask covers {mask.shape[1]} models but model_paths lists {len(models)}")
    num_r = data.get("num_r")
    if num_r is not None and (isinstance(num_r, bool) or not isinstance(num_r, int)):
        raise InputError(f"num_r must be an integer, got {num_r!r}")
    if num_r is not None and num_r != mask.shape[0]:
        raise InputError(f"num_r = {num_r} but layer_mask has {mask.shape[0]} repetitions")
    flags = {}
    for key, default in (("add_last_layer", True), ("classification", False)):
        value = data.get(key, default)
        if not isinstance(value, bool):
            raise InputError(f"'{key}' must be true or false, got {value!r}")
        flags[key] = value
    last_scale = data.get("last_layer_scale", 1.0)
    if isinstance(last_scale, bool) or not isinstance(last_scale, int | float):
        raise InputError(f"'last_layer_scale' must be a number, got {last_scale!r}")
    indices = {}
    for key in ("input_layer_model", "output_layer_model"):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(models):
            raise InputError(f"'{key}' must be a model index in 0..{len(models) - 1}, got {value!r}")
        indices[key] = value
    for key in ("scaling_factors", "bias_factors"):
        value = data.get(key)
        if value is not None:
            try:
                np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"'{key}' must be a rectangular array of numbers") from None
    return DfsRecipe(
        models=models,
        mask=mask,
        scaling_factors=data.get("scaling_factors"),
        bias_factors=data.get("bias_factors"),
        input_model=indices["input_layer_model"],
        output_model=indices["output_layer_model"],
        add_last_layer=flags["add_last_layer"],
        last_layer_scale=float(last_scale),
        classification=flags["classification"],
        scale_target=str(data.get("scale_target", "branch")),
    )


def _model_refs(value: Any) -> tuple[tuple[str, str | None], ...]:
    if not isinstance(value, list | tuple) or not value:
        raise InputError("'model_paths' must be a non-empty list of model paths or [path, revision] pairs")
    refs: list[tuple[str, str | None]] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            refs.append((item, None))
        elif (
            isinstance(item, list | tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and (item[1] is None or isinstance(item[1], str))
        ):
            refs.append((item[0], item[1]))
        else:
            raise InputError(f"model_paths[{i}] must be a path or a [path, revision] pair, got {item!r}")
    return tuple(refs)
