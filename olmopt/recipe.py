"""The Recipe: a small, typed, versioned, JSON-serialisable description of a merged model.

Everything speaks Recipe: a trial decodes into one, the patcher applies one to the resident model, the
export rebuilds the model from one and merge_report.json embeds it. Donors are pool model names.
Order of application: base -> parameter-space merge -> boundary -> layers -> units -> ES steps ->
depth fusion -> data-flow path.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from olmopt.errors import InputError
from olmopt.methods.dfs.path import DfsPath

RECIPE_VERSION = 1
# a donor name for the Recipe's own parameter-space merge: ``layers={3: "@merge"}`` takes layer 3 from
# ``param_merge`` (what later donor-choice stages pick to keep a PS-merged layer, Sakana's PS then layers)
MERGE_DONOR = "@merge"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EsStep(_Strict):
    """One accepted evolution-strategy step, replayable from its seed (noise is never stored)."""

    unit: str
    kind: Literal["svd", "norm"]
    sigma: float = Field(gt=0)
    seed: int = Field(ge=0)


LayerValue = float | tuple[float, ...]


class ParamMerge(_Strict):
    """A parameter-space merge: ``models`` (highest priority first) as deltas against ``base``.

    ``layer_params`` makes parameters layer-wise: ``{name: (value of group 0, value of group 1, ...)}``
    where group g is layers ``g*group_size .. (g+1)*group_size - 1`` (the last group may be shorter) and
    a value is what ``params`` would hold (a scalar, or a tuple with one value per variant). A layer's
    values are ``params`` overridden by its group's ``layer_params``; tensors outside the layers take
    mergekit's convention: the embedding those of layer 0, the final norm and the head those of the last
    layer.
    """

    method: str
    base: str | None = None  # defaults to the recipe's base (filled in by Recipe validation)
    models: tuple[str, ...]
    # a tuple holds one value per variant (``olmopt.methods.registry`` per-variant parameters)
    params: dict[str, float | int | bool | str | tuple[float, ...]] = Field(default_factory=dict)
    seed: int = 0
    layer_params: dict[str, tuple[LayerValue, ...]] = Field(default_factory=dict)
    group_size: int = Field(1, ge=1)

    @field_validator("layer_params")
    @classmethod
    def _non_empty(cls, value: dict[str, tuple[LayerValue, ...]]) -> dict[str, tuple[LayerValue, ...]]:
        for key, groups in value.items():
            if not groups:
                raise ValueError(f"layer_params.{key} is an empty list")
        return value

    def num_groups(self, num_layers: int) -> int:
        """How many layer groups a model of ``num_layers`` layers has (what ``layer_params`` lists hold)."""
        return -(-num_layers // self.group_size)

    def params_at(self, layer: int) -> dict[str, Any]:
        """The raw parameter values of layer ``layer`` (``params`` with its group's layer-wise values)."""
        if not self.layer_params:
            return dict(self.params)
        group = layer // self.group_size
        return {**self.params, **{k: v[group] for k, v in self.layer_params.items()}}

    def check_layers(self, num_layers: int) -> None:
        """One-line InputError for layer-wise lists of the wrong length or values a group cannot take."""
        from olmopt.methods.delta import make_params  # the registry: no torch

        want = self.num_groups(num_layers)
        for key, groups in sorted(self.layer_params.items()):
            if len(groups) != want:
                raise InputError(
                    f"recipe: param_merge.layer_params.{key} has {len(groups)} values for {want} layer "
                    f"groups ({num_layers} layers, group_size {self.group_size})"
                )
        for group in range(want if self.layer_params else 1):
            try:
                make_params(self.method, self.params_at(group * self.group_size)).resolve(len(self.models))
            except InputError as exc:
                where = f"layer group {group}: " if self.layer_params else ""
                raise InputError(f"recipe: param_merge: {where}{exc}") from None


class FusionStep(_Strict):
    """Fuse layer ``remove`` into layer ``into``: W_into <- alpha*W_into + (1-alpha)*W_remove.

    One step of the depth-fusion chain, in a Recipe and in the maths (``olmopt.methods.fusion.maths``).
    """

    into: int = Field(ge=0)
    remove: int = Field(ge=0)
    alpha: float = Field(ge=0, le=1)


class Recipe(_Strict):
    """A merged model relative to a pool."""

    version: int = RECIPE_VERSION
    base: str
    boundary: str | None = None
    layers: dict[int, str] = Field(default_factory=dict)
    units: dict[str, str] = Field(default_factory=dict)
    es: tuple[EsStep, ...] = ()
    param_merge: ParamMerge | None = None
    fusion: tuple[FusionStep, ...] = ()
    dfs: DfsPath | None = None  # models by pool name

    @model_validator(mode="after")
    def _merge_base(self) -> Recipe:
        if self.param_merge is not None and self.param_merge.base is None:
            object.__setattr__(self, "param_merge", self.param_merge.model_copy(update={"base": self.base}))
        return self

    @field_validator("dfs")
    @classmethod
    def _named_path(cls, path: DfsPath | None) -> DfsPath | None:
        if path is not None and path.is_indexed:
            raise ValueError("a Recipe's data-flow path names pool models, not model indices")
        return path

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > RECIPE_VERSION:
            raise ValueError(f"recipe version {v} is newer than this olmopt understands ({RECIPE_VERSION})")
        return v

    # -- JSON form -------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["version"] = self.version
        data["base"] = self.base
        return data

    @classmethod
    def from_json(cls, text: str | bytes) -> Recipe:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise InputError(f"recipe: not valid JSON: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "recipe"
            raise InputError(f"recipe: {where}: {err['msg']}") from None

    def digest(self) -> str:
        """Short stable hash, used as a cache key for the model state a recipe describes."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # -- edits (recipes are immutable; these return new ones) -------------------------------------
    def with_layer(self, index: int, donor: str) -> Recipe:
        layers = dict(self.layers)
        layers[index] = donor
        return self.model_copy(update={"layers": layers})

    def with_unit(self, unit: str, donor: str) -> Recipe:
        units = dict(self.units)
        units[unit] = donor
        return self.model_copy(update={"units": units})

    def with_es(self, step: EsStep) -> Recipe:
        return self.model_copy(update={"es": (*self.es, step)})

    def renamed(self, mapping: dict[str, str]) -> Recipe:
        """The same recipe with donors renamed (e.g. hub ids -> local directories)."""

        def m(name: str) -> str:
            return mapping.get(name, name)

        update: dict[str, Any] = {
            "base": m(self.base),
            "boundary": m(self.boundary) if self.boundary else None,
            "layers": {k: m(v) for k, v in self.layers.items()},
            "units": {k: m(v) for k, v in self.units.items()},
        }
        if self.param_merge:
            pm = self.param_merge
            update["param_merge"] = pm.model_copy(
                update={"base": m(pm.base) if pm.base else None, "models": tuple(m(x) for x in pm.models)}
            )
        if self.dfs:
            update["dfs"] = self.dfs.renamed(mapping)
        return self.model_copy(update=update)

    @property
    def boundary_donor(self) -> str:
        """The donor of the boundary (embeddings, final norm, head): ``boundary``, else the parameter-space
        merge (``MERGE_DONOR``) where there is one, else ``base``."""
        return self.boundary or (MERGE_DONOR if self.param_merge is not None else self.base)

    def donors(self) -> set[str]:
        """The pool models the Recipe reads (``MERGE_DONOR`` is not one: it names ``param_merge``)."""
        names = {self.base, *self.layers.values(), *self.units.values()}
        if self.boundary:
            names.add(self.boundary)
        if self.param_merge:
            names.update(self.param_merge.models)
        if self.dfs:
            names.update(str(model) for model in self.dfs.models_used)
        names.discard(MERGE_DONOR)
        return names

    def validate_against(self, pool_names: list[str], num_layers: int, units: list[str]) -> None:
        """One-line InputError for donors outside the pool, layers out of range, unknown units."""
        named = {self.boundary, *self.layers.values(), *self.units.values()}
        if self.dfs:
            named.update(str(model) for model in self.dfs.models_used)
        uses_merge = MERGE_DONOR in named
        if uses_merge and self.param_merge is None:
            raise InputError(
                f"recipe: donor {MERGE_DONOR!r} names the parameter-space merge, but param_merge is not set"
            )
        for name in sorted(self.donors()):
            if name not in pool_names:
                raise InputError(f"recipe: donor {name!r} is not in the pool ({', '.join(pool_names)})")
        if self.param_merge is not None:
            self.param_merge.check_layers(num_layers)
        for index in self.layers:
            if not 0 <= index < num_layers:
                raise InputError(f"recipe: layer {index} out of range (model has {num_layers} layers)")
        known = set(units)
        for unit in [*self.units, *(s.unit for s in self.es)]:
            if unit not in known:
                raise InputError(f"recipe: unit {unit!r} does not exist in this architecture")


def layers_removed(recipe: Recipe, num_layers: int) -> float:
    """How many fewer decoder layers than ``num_layers`` the Recipe's model runs (``layers_removed``)."""
    if recipe.dfs is not None:
        return float(num_layers - len(recipe.dfs.hops))
    return float(len(recipe.fusion))
