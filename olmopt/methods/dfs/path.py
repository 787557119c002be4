"""The data-flow-space (DFS) path: one type for a layer path, in a Recipe and on loaded models.

A path is a sequence of hops, each running one decoder layer ``(model, layer)`` of a pool of
homologous models, with a transform on what enters the hop (a scale, optionally an affine map). A
model is named by its pool name in a Recipe (``Recipe.dfs``) and by its position in a list of loaded
models when a path runs or is exported (``DfsPath.indexed(names)``). Torch-free at import (tensors
only appear in affine maps); the maths is ``olmopt.methods.dfs.maths``, the semantics and the fold
derivation are in docs/dfs.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from olmopt.errors import InputError

if TYPE_CHECKING:
    import torch

ScaleTarget = Literal["branch", "stream"]
SCALE_TARGETS: tuple[str, ...] = ("branch", "stream")
NEUTRAL_SCALE = 1.0


@dataclass(frozen=True, eq=False)
class HopAffine:
    """An affine map on a hop's incoming branch: ``v -> s * (weight @ v) + bias``.

    ``weight`` is ``(H, H)`` (``None`` = identity), ``bias`` is ``(H,)`` (``None`` = zero).
    """

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.weight is None and self.bias is None:
            raise InputError("affine map: give a weight, a bias or both (use None for no affine map)")
        if self.weight is not None and (
            self.weight.dim() != 2 or self.weight.shape[0] != self.weight.shape[1]
        ):
            raise InputError(f"affine weight must be square (H, H), got shape {tuple(self.weight.shape)}")
        if self.bias is not None and self.bias.dim() != 1:
            raise InputError(f"affine bias must be a vector (H,), got shape {tuple(self.bias.shape)}")
        if self.weight is not None and self.bias is not None and self.bias.shape[0] != self.weight.shape[0]:
            raise InputError(
                f"affine bias has {self.bias.shape[0]} entries but the weight is {tuple(self.weight.shape)}"
            )
        for name, tensor in (("weight", self.weight), ("bias", self.bias)):
            if tensor is not None and not bool(tensor.isfinite().all()):
                raise InputError(f"affine {name} contains NaN or infinite values")

    @property
    def size(self) -> int:
        """The hidden size the map acts on."""
        tensor = self.weight if self.weight is not None else self.bias
        assert tensor is not None
        return int(tensor.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": None if self.weight is None else self.weight.double().tolist(),
            "bias": None if self.bias is None else self.bias.double().tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HopAffine:
        if not isinstance(data, dict) or set(data) - {"weight", "bias"}:
            raise InputError("affine entry must be null or an object with keys 'weight' and/or 'bias'")
        weight, bias = data.get("weight"), data.get("bias")
        return cls(
            weight=None if weight is None else _float_tensor(weight, "affine weight"),
            bias=None if bias is None else _float_tensor(bias, "affine bias"),
        )


def _float_tensor(value: Any, what: str) -> torch.Tensor:
    import torch  # affine maps only: the path type itself needs no torch

    try:
        return torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: not a numeric array ({exc})") from None


ModelRef = int | str
"""A model on a path: its pool name (in a Recipe) or its position in a list of loaded models."""


@dataclass(frozen=True, eq=False)
class DfsPath:
    """A DFS path: hops ``(model, layer)``, a scale per hop, optional affine maps per hop.

    ``input_model`` supplies the embedding, ``output_model`` the final norm and the head (``lm_head``
    or ``score``). Models are all pool names (a Recipe's path) or all indices into a list of loaded
    models (what runs and exports; ``indexed``). ``affine`` is empty (no affine maps) or has one entry
    (``HopAffine`` or ``None``) per hop. ``scale_target`` is ``"branch"`` (seed semantics) or
    ``"stream"`` (see ``olmopt.methods.dfs.maths``). Two paths are equal when every field is, affine
    tensors included. In a Recipe's JSON the path is ``recipe_dict()``.
    """

    hops: tuple[tuple[ModelRef, int], ...]
    scales: tuple[float, ...]
    affine: tuple[HopAffine | None, ...] = field(default=())
    input_model: ModelRef = 0
    output_model: ModelRef = 0
    scale_target: ScaleTarget = "branch"

    def __post_init__(self) -> None:
        hops = tuple((_model_ref(m, "hop model"), _index(l_, "hop layer")) for m, l_ in self.hops)
        object.__setattr__(self, "hops", hops)
        object.__setattr__(
            self, "scales", tuple(finite_number(s, f"scales[{k}]") for k, s in enumerate(self.scales))
        )
        object.__setattr__(self, "affine", tuple(self.affine))
        if not hops:
            raise InputError("DFS path is empty: select at least one layer")
        if len(self.scales) != len(hops):
            raise InputError(f"DFS path has {len(hops)} hops but {len(self.scales)} scales")
        if self.affine and len(self.affine) != len(hops):
            raise InputError(f"DFS path has {len(hops)} hops but {len(self.affine)} affine entries")
        if self.affine and all(a is None for a in self.affine):
            object.__setattr__(self, "affine", ())
        object.__setattr__(self, "input_model", _model_ref(self.input_model, "input_model"))
        object.__setattr__(self, "output_model", _model_ref(self.output_model, "output_model"))
        if len({type(m) for m, _ in hops} | {type(self.input_model), type(self.output_model)}) > 1:
            raise InputError("DFS path mixes model names and model indices: use one or the other")
        if self.scale_target not in SCALE_TARGETS:
            raise InputError(f"scale_target must be one of {SCALE_TARGETS}, got {self.scale_target!r}")
        if self.scale_target == "stream" and self.affine:
            raise InputError("affine maps act on the branch output: they need scale_target 'branch'")
        sizes = {a.size for a in self.affine if a is not None}
        if len(sizes) > 1:
            raise InputError(f"affine maps of different sizes in one path: {sorted(sizes)}")

    @property
    def num_hops(self) -> int:
        return len(self.hops)

    @property
    def models_used(self) -> list[ModelRef]:
        """Models the path touches (hops, input and output), sorted."""
        return sorted({m for m, _ in self.hops} | {self.input_model, self.output_model})

    @property
    def is_indexed(self) -> bool:
        """True when the models are indices into a list of loaded models (not pool names)."""
        return isinstance(self.input_model, int)

    @property
    def input_index(self) -> int:
        """``input_model`` of an indexed path (a named path is refused: see ``indexed``)."""
        return _position(self.input_model)

    @property
    def output_index(self) -> int:
        """``output_model`` of an indexed path."""
        return _position(self.output_model)

    @property
    def hop_indices(self) -> tuple[tuple[int, int], ...]:
        """``hops`` of an indexed path: (model index, layer)."""
        return tuple((_position(m), layer) for m, layer in self.hops)

    def indexed(self, names: Sequence[str]) -> DfsPath:
        """The same path with models as positions in ``names`` (a pool's order); an indexed path as is."""
        if self.is_indexed:
            return self
        position = {name: i for i, name in enumerate(names)}

        def index(model: ModelRef) -> int:
            if model not in position:
                raise InputError(f"DFS path: model {model!r} is not in the pool ({', '.join(names)})")
            return position[str(model)]

        return dataclasses.replace(
            self,
            hops=tuple((index(m), layer) for m, layer in self.hops),
            input_model=index(self.input_model),
            output_model=index(self.output_model),
        )

    def renamed(self, mapping: dict[str, str]) -> DfsPath:
        """The same path with the named models renamed by ``mapping`` (others, and indices, kept)."""

        def rename(model: ModelRef) -> ModelRef:
            return mapping.get(model, model) if isinstance(model, str) else model

        return dataclasses.replace(
            self,
            hops=tuple((rename(m), layer) for m, layer in self.hops),
            input_model=rename(self.input_model),
            output_model=rename(self.output_model),
        )

    def affine_at(self, hop: int) -> HopAffine | None:
        return self.affine[hop] if self.affine else None

    def is_identity_at(self, hop: int) -> bool:
        """True when hop ``hop``'s transform leaves its input unchanged (scale 1, no affine map)."""
        return self.scales[hop] == NEUTRAL_SCALE and self.affine_at(hop) is None

    def _plain_fields(self) -> tuple[Any, ...]:
        return (
            self.hops,
            self.scales,
            self.input_model,
            self.output_model,
            self.scale_target,
            len(self.affine),
        )

    def equals(self, other: DfsPath) -> bool:
        """Exact equality, affine tensors included."""
        if self._plain_fields() != other._plain_fields():
            return False
        return all(_same_affine(self.affine_at(k), other.affine_at(k)) for k in range(self.num_hops))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DfsPath) and self.equals(other)

    def __hash__(self) -> int:
        return hash(self._plain_fields())

    def to_dict(self) -> dict[str, Any]:
        """Every field (the form of ``dfs_path.json`` and of ``to_json``)."""
        return {
            "hops": [[m, l_] for m, l_ in self.hops],
            "scales": list(self.scales),
            "affine": [None if a is None else a.to_dict() for a in self.affine] if self.affine else None,
            "input_model": self.input_model,
            "output_model": self.output_model,
            "scale_target": self.scale_target,
        }

    def recipe_dict(self) -> dict[str, Any]:
        """The form in a Recipe's JSON: hops, scales, input and output model, other fields when set."""
        data = {key: value for key, value in self.to_dict().items() if key not in ("affine", "scale_target")}
        if self.affine:
            data["affine"] = self.to_dict()["affine"]
        if self.scale_target != "branch":
            data["scale_target"] = self.scale_target
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DfsPath:
        if not isinstance(data, dict):
            raise InputError("DFS path must be a JSON object")
        unknown = set(data) - {"hops", "scales", "affine", "input_model", "output_model", "scale_target"}
        if unknown:
            raise InputError(f"DFS path: unknown key(s) {sorted(unknown)}")
        if "hops" not in data:
            raise InputError("DFS path: missing key 'hops'")
        hops = data["hops"]
        if not isinstance(hops, list | tuple) or not all(
            isinstance(h, list | tuple) and len(h) == 2 for h in hops
        ):
            raise InputError("DFS path: 'hops' must be a list of [model, layer] pairs")
        scales = data.get("scales")
        if scales is None:
            scales = [NEUTRAL_SCALE] * len(hops)
        if not isinstance(scales, list | tuple):
            raise InputError("DFS path: 'scales' must be a list of numbers")
        affine = data.get("affine") or []
        if not isinstance(affine, list | tuple):
            raise InputError("DFS path: 'affine' must be null or a list with one entry per hop")
        return cls(
            hops=tuple((h[0], h[1]) for h in hops),
            scales=tuple(scales),
            affine=tuple(None if a is None else HopAffine.from_dict(a) for a in affine),
            input_model=data.get("input_model", 0),
            output_model=data.get("output_model", 0),
            scale_target=data.get("scale_target", "branch"),
        )

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> DfsPath:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise InputError(f"DFS path: invalid JSON ({exc})") from None
        return cls.from_dict(data)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """As a pydantic field (``Recipe.dfs``): validated by ``from_dict``, serialised by ``recipe_dict``."""
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls._validate,
            serialization=core_schema.plain_serializer_function_ser_schema(lambda path: path.recipe_dict()),
        )

    @classmethod
    def _validate(cls, value: Any) -> DfsPath:
        if isinstance(value, cls):
            return value
        try:
            return cls.from_dict(value)
        except InputError as exc:  # pydantic reports a ValueError with the field's location
            raise ValueError(str(exc)) from None


def _same_affine(a: HopAffine | None, b: HopAffine | None) -> bool:
    if a is None or b is None:
        return a is b

    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and x.equal(y))

    return same(a.weight, b.weight) and same(a.bias, b.bias)


def _model_ref(value: Any, what: str) -> ModelRef:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InputError(f"{what} must be a pool model name or a non-negative index, got {value!r}")
    return int(value)


def _position(model: ModelRef) -> int:
    if not isinstance(model, int):
        raise InputError(f"DFS path names its models ({model!r}): index it over the pool's names first")
    return model


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise InputError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def finite_number(value: Any, what: str) -> float:
    """``value`` as a float; a one-line InputError naming ``what`` for a non-number, NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise InputError(f"{what} must be finite, got {value!r}")
    return float(value)
