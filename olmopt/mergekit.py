"""mergekit configurations in and out: a Recipe as a mergekit YAML, and a mergekit YAML as a Recipe.

Out (``recipe_to_mergekit``): a parameter-space merge with global values is mergekit's ``models`` form;
layer-wise values become ``slices``, one per run of adjacent layers with equal values, each source with
its scalar ``parameters``; a pure donor Recipe (base, boundary, whole layers) becomes ``passthrough``
slices. What mergekit cannot express (Circuit-Merge, per-tensor donors, ES steps, fusion, data-flow
paths, a PS merge mixed with donor layers, an embedding or head from another model than the first or
last layer) raises ``NotExpressible`` with the reason.

In (``parse_mergekit``): the keys of mergekit's ``MergeConfiguration`` that olmopt executes:
``merge_method`` (any olmopt method, or ``passthrough``), ``base_model``, ``models`` or ``slices`` (every
slice the same models, layer ranges at their own position), ``parameters`` at the top, slice and model
level with mergekit's precedence (model, slice, top), scalars or gradient lists evaluated exactly as
mergekit does (``t`` = index / (layers in the slice - 1); the embedding takes t = 0 of the first slice,
the final norm and head t = 1 of the last), ``dtype`` (ignored: olmopt computes in float32),
``out_dtype`` (must be the base's dtype: olmopt writes that), ``tokenizer_source: base``, and
olmopt's ``seed`` for random methods. Anything else is an error naming its key.

This module imports neither torch nor Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from olmopt import __version__
from olmopt.errors import InputError
from olmopt.methods.delta import get_method, make_params
from olmopt.methods.registry import MethodSpec, Param, canonical_name
from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import MERGE_DONOR, ParamMerge, Recipe

PER_MODEL_NAMES = {"weights": "weight"}  # olmopt per-variant name -> mergekit's (others are the same)
NOT_IN_MERGEKIT = {"circuit"}  # olmopt methods mergekit lacks
OLMOPT_ONLY = {
    "sign_election",
    "base_weight",
    "drop_rates",
}  # parameters mergekit lacks (base_weight: base's weight)
IGNORED_PARAMS = {"int8_mask"}  # mergekit's memory option: olmopt accepts and ignores it
# ``seed``: olmopt's extension for random methods (mergekit ignores keys it does not know)
TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "seed",
}
UNSUPPORTED_TOP_KEYS = {"modules", "tokenizer", "chat_template"}
OUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # mergekit's names -> safetensors'


class NotExpressible(Exception):
    """A Recipe that mergekit cannot express; the message says why."""


# -- out: Recipe -> mergekit ----------------------------------------------------------------------
def recipe_to_mergekit(recipe: Recipe, adapter: ArchitectureAdapter) -> dict[str, Any]:
    """The mergekit configuration (a plain dict for YAML) of ``recipe``, or NotExpressible."""
    if recipe.es:
        raise NotExpressible("the Recipe has ES steps (mergekit has no replayable noise)")
    if recipe.fusion:
        raise NotExpressible("the Recipe fuses layers (mergekit has no depth fusion)")
    if recipe.dfs:
        raise NotExpressible("the Recipe is a data-flow path with per-hop scales")
    if recipe.param_merge is not None:
        picks = {recipe.boundary, *recipe.layers.values(), *recipe.units.values()} - {None}
        if picks == {MERGE_DONOR}:  # every pick keeps the PS merge: the PS merge alone
            return _ps_config(recipe.param_merge, adapter)
        if picks:
            raise NotExpressible(
                "the Recipe mixes a parameter-space merge with donor layers or tensors (mergekit runs one "
                "method)"
            )
        return _ps_config(recipe.param_merge, adapter)
    return _passthrough_config(recipe, adapter)


def _passthrough_config(recipe: Recipe, adapter: ArchitectureAdapter) -> dict[str, Any]:
    n = adapter.num_layers
    layer_donor = [recipe.layers.get(i, recipe.base) for i in range(n)]
    for unit, donor in recipe.units.items():
        layer = adapter.layer_of(unit)
        if layer is not None and donor != layer_donor[layer]:
            raise NotExpressible(
                f"tensor {unit} comes from {donor}, the rest of layer {layer} from another model"
            )
    outer = recipe.boundary or recipe.base
    embed = recipe.units.get(adapter.embed, outer)
    tail = {
        recipe.units.get(u, outer)
        for u in (adapter.final_norm, *(() if adapter.tied_embeddings else (adapter.lm_head,)))
    }
    if len(tail) > 1:
        raise NotExpressible("the final norm and the head come from different models")
    if embed != layer_donor[0]:
        raise NotExpressible(
            f"the embedding comes from {embed} but layer 0 from {layer_donor[0]} "
            "(mergekit's passthrough takes the embedding from the first slice's model)"
        )
    (last,) = tail
    if last != layer_donor[-1]:
        raise NotExpressible(
            f"the final norm and head come from {last} but layer {n - 1} from {layer_donor[-1]} "
            "(mergekit's passthrough takes them from the last slice's model)"
        )
    slices = [{"sources": [{"model": layer_donor[a], "layer_range": [a, b]}]} for a, b in _runs(layer_donor)]
    return {"merge_method": "passthrough", "slices": slices}


def _runs(values: Sequence[Any]) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal adjacent values."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i))
            start = i
    return runs


def _ps_config(merge: ParamMerge, adapter: ArchitectureAdapter) -> dict[str, Any]:
    spec = get_method(merge.method)
    if spec.name in NOT_IN_MERGEKIT:
        raise NotExpressible(f"mergekit has no method {spec.name}")
    base = merge.base or ""
    count = len(merge.models)
    per_layer = [make_params(spec.name, merge.params_at(i)).resolve(count) for i in range(adapter.num_layers)]
    defaults = make_params(spec.name).resolve(count)
    for values in per_layer:
        for name in OLMOPT_ONLY - {"base_weight"}:
            if name in values and values[name] != defaults[name]:
                raise NotExpressible(f"{spec.name}: {name}={values[name]} has no mergekit equivalent")

    def sources(values: Mapping[str, Any], layer_range: list[int] | None) -> list[dict[str, Any]]:
        out = []
        for index, model in enumerate((base, *merge.models)):
            entry: dict[str, Any] = {"model": model}
            if layer_range is not None:
                entry["layer_range"] = layer_range
            params: dict[str, Any] = {}
            if index == 0:
                if "base_weight" in values:
                    params["weight"] = values["base_weight"]
            else:
                for param in spec.params:
                    value = values[param.name]
                    if param.per_variant and value is not None and param.name not in OLMOPT_ONLY:
                        params[PER_MODEL_NAMES.get(param.name, param.name)] = value[index - 1]
            if params:
                entry["parameters"] = params
            out.append(entry)
        return out

    def shared(values: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for param in spec.params:
            if param.per_variant or param.name in OLMOPT_ONLY:
                continue
            value = values[param.name]
            if value != defaults[param.name] or param.default is None or param.name == "t":
                out[param.name] = value
        return out

    config: dict[str, Any] = {"merge_method": spec.name, "base_model": base}
    if spec.stochastic:
        config["seed"] = merge.seed
    keys = [tuple(sorted((k, repr(v)) for k, v in values.items())) for values in per_layer]
    runs = _runs(keys)
    if len(runs) == 1:
        config["models"] = sources(per_layer[0], None)
        top = shared(per_layer[0])
        if top:
            config["parameters"] = top
    else:
        config["slices"] = []
        for a, b in runs:
            piece: dict[str, Any] = {"sources": sources(per_layer[a], [a, b])}
            params = shared(per_layer[a])
            if params:
                piece["parameters"] = params
            config["slices"].append(piece)
    return config


def mergekit_yaml(config: dict[str, Any], recipe: Recipe) -> str:
    """The YAML text of ``config`` with a header naming its origin and the divergences."""
    header = (
        f"# mergekit configuration written by olmopt {__version__} for Recipe {recipe.digest()}.\n"
        "# olmopt computes in float32; DARE's rescale, TIES/breadcrumbs ties in magnitude, random draws and\n"
        "# lambda on methods other than DELLA (older mergekit) differ from mergekit: see docs/methods.md.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


# -- in: mergekit -> Recipe -------------------------------------------------------------------------
@dataclass(frozen=True)
class MergekitConfig:
    """A parsed mergekit YAML: the model references (base first) and a function of the layer count
    (read from the base model's config) that builds the Recipe."""

    models: tuple[str, ...]
    keys: tuple[str, ...]  # the YAML key naming each model (for errors)
    build: Callable[[ArchitectureAdapter], Recipe]
    out_dtype: str | None = None  # safetensors dtype name asked for by ``out_dtype`` (F32, BF16, F16)


def load_mergekit(path: Path) -> MergekitConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return parse_mergekit(data)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{key}: expected a non-empty list")
    return value


def _model_ref(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{key}: expected a model path or hub id")
    if "+" in value:
        raise InputError(f"{key}: LoRA references (model+lora) are not supported")
    return value


def _check_keys(entry: dict[str, Any], allowed: set[str], key: str) -> None:
    for name in entry:
        if name not in allowed:
            raise InputError(f"{key}.{name}: unknown key (expected one of {', '.join(sorted(allowed))})")


@dataclass(frozen=True)
class _Source:
    model: str
    key: str
    layer_range: tuple[int, int] | None
    parameters: dict[str, Any]


def parse_mergekit(data: Any) -> MergekitConfig:
    """Validate a mergekit configuration (every problem one line naming its key)."""
    top = _mapping(data, "config")
    for name in top:
        if name in UNSUPPORTED_TOP_KEYS:
            raise InputError(f"{name}: not supported by olmopt (see docs/methods.md, mergekit interop)")
        if name not in TOP_KEYS:
            raise InputError(f"{name}: unknown key")
    if "merge_method" not in top:
        raise InputError("merge_method: required")
    method = top["merge_method"]
    if method != "passthrough":
        try:
            method = canonical_name(str(method))
        except InputError as exc:
            raise InputError(f"merge_method: {exc}") from None
    if top.get("tokenizer_source") not in (None, "base"):
        raise InputError("tokenizer_source: only 'base' is supported (olmopt copies the base's tokenizer)")
    if ("models" in top) == ("slices" in top):
        raise InputError("models, slices: give exactly one of them")
    top_params = _mapping(top.get("parameters") or {}, "parameters")
    out_dtype = top.get("out_dtype")
    if out_dtype is not None and out_dtype not in OUT_DTYPES:
        raise InputError(f"out_dtype: expected one of {', '.join(OUT_DTYPES)}, got {out_dtype!r}")
    out_dtype = OUT_DTYPES.get(out_dtype) if out_dtype is not None else None
    seed = top.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed: expected an integer >= 0, got {seed!r}")
    base_ref = _model_ref(top["base_model"], "base_model") if top.get("base_model") is not None else None

    slices: list[tuple[list[_Source], dict[str, Any], str]] = []
    if "models" in top:
        sources = []
        for i, entry in enumerate(_list(top["models"], "models")):
            key = f"models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            entry = _mapping(entry, key)
            _check_keys(entry, {"model", "parameters"}, key)
            params = _mapping(entry.get("parameters") or {}, f"{key}.parameters")
            sources.append(_Source(_model_ref(entry.get("model"), f"{key}.model"), key, None, params))
        slices.append((sources, {}, "models"))
    else:
        for s, piece in enumerate(_list(top["slices"], "slices")):
            key = f"slices[{s}]"
            piece = _mapping(piece, key)
            _check_keys(piece, {"sources", "parameters", "base_model"}, key)
            if piece.get("base_model") is not None:
                raise InputError(
                    f"{key}.base_model: a base model per slice is not supported (one Recipe base)"
                )
            sources = []
            for i, entry in enumerate(_list(piece.get("sources"), f"{key}.sources")):
                skey = f"{key}.sources[{i}]"
                entry = _mapping(entry, skey)
                _check_keys(entry, {"model", "layer_range", "parameters"}, skey)
                lr = entry.get("layer_range")
                if not (
                    isinstance(lr, list)
                    and len(lr) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                ):
                    raise InputError(f"{skey}.layer_range: expected [start, stop]")
                params = _mapping(entry.get("parameters") or {}, f"{skey}.parameters")
                sources.append(
                    _Source(_model_ref(entry.get("model"), f"{skey}.model"), skey, (lr[0], lr[1]), params)
                )
            slices.append((sources, _mapping(piece.get("parameters") or {}, f"{key}.parameters"), key))

    refs: dict[str, str] = {}
    if base_ref is not None:
        refs[base_ref] = "base_model"
    for sources, _, _ in slices:
        if len({src.model for src in sources}) != len(sources):
            twice = next(src for i, src in enumerate(sources) if src.model in [o.model for o in sources[:i]])
            raise InputError(f"{twice.key}.model: {twice.model} is listed twice")
        for src in sources:
            refs.setdefault(src.model, f"{src.key}.model")
    if method == "passthrough":
        if top_params:
            raise InputError("parameters: passthrough takes no parameters")
        for sources, params, key in slices:
            if len(sources) != 1:
                raise InputError(f"{key}.sources: passthrough takes one source per slice")
            if params or sources[0].parameters:
                raise InputError(f"{key}: passthrough takes no parameters")
        if "models" in top and len(slices[0][0]) != 1:
            raise InputError("models: passthrough takes one model (or slices)")
        base = base_ref or slices[0][0][0].model
        models = [base, *[m for m in refs if m != base]]
        return MergekitConfig(
            tuple(models),
            tuple(refs[m] for m in models),
            lambda a: _passthrough_recipe(slices, base, a),
            out_dtype,
        )

    spec = get_method(method)
    first = [src.model for src in slices[0][0]]
    for sources, _, key in slices:
        if [src.model for src in sources] != first:
            raise InputError(
                f"{key}.sources: every slice must list the same models in the same order as the first"
            )
    base = base_ref or first[0]
    variants = [m for m in first if m != base]
    if not variants:
        raise InputError("models: no model to merge besides the base")
    try:
        spec.check_count(len(variants))
    except InputError as exc:
        raise InputError(f"merge_method: {exc}") from None
    _check_param_names(spec, top_params, "parameters", per_model=True)
    for sources, params, key in slices:
        _check_param_names(spec, params, f"{key}.parameters", per_model=True)
        for src in sources:
            _check_param_names(spec, src.parameters, f"{src.key}.parameters", per_model=True)
    models = [base, *variants]
    return MergekitConfig(
        tuple(models),
        tuple(refs[m] for m in models),
        lambda adapter: _ps_recipe(spec, slices, top_params, base, variants, adapter, seed),
        out_dtype,
    )


def _check_param_names(spec: MethodSpec, params: dict[str, Any], key: str, per_model: bool) -> None:
    for name in params:
        if name in IGNORED_PARAMS:
            continue
        try:
            spec.param(str(name))
        except InputError:
            raise InputError(f"{key}.{name}: method {spec.name} has no parameter {name!r}") from None
        evaluate_setting(
            params[name], 0.0, f"{key}.{name}"
        )  # shape of the setting, filters: refused up front


def layer_position(index: int, count: int) -> float:
    """Where layer ``index`` of ``count`` sits on a gradient (mergekit's ``t``: 0 first, 1 last)."""
    return index / (count - 1) if count > 1 else 1.0


def evaluate_setting(setting: Any, t: float, key: str) -> Any:
    """A mergekit parameter setting at position ``t`` (its ``evaluate_setting``, filters refused)."""
    if isinstance(setting, bool | int | float):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(e, int | float) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for i, cond in enumerate(setting):
            if not isinstance(cond, dict):
                raise InputError(f"{key}[{i}]: expected a number or a {{value, filter}} mapping")
            _check_keys(cond, {"value", "filter"}, f"{key}[{i}]")
            if cond.get("filter") not in (None, "*"):
                raise InputError(
                    f"{key}[{i}].filter: per-tensor filters are not supported (olmopt's values are per layer)"
                )
            if "value" not in cond:
                raise InputError(f"{key}[{i}].value: required")
            return evaluate_setting(cond["value"], t, f"{key}[{i}].value")
    raise InputError(
        f"{key}: expected a number, a list of numbers or {{value, filter}} mappings, got {setting!r}"
    )


def _slice_ranges(slices: list[tuple[list[_Source], dict[str, Any], str]], n: int) -> list[tuple[int, int]]:
    """[start, stop) of each slice in output layers; sources must sit at their own position."""
    ranges, position = [], 0
    for sources, _, _key in slices:
        if sources[0].layer_range is None:
            ranges.append((0, n))
            position = n
            continue
        for src in sources:
            a, b = src.layer_range  # type: ignore[misc]
            if (a, b) != sources[0].layer_range:
                raise InputError(f"{src.key}.layer_range: every source of a slice takes the same layers")
            if a != position or not a < b <= n:
                raise InputError(
                    f"{src.key}.layer_range: [{a}, {b}] must start at layer {position} and end by {n} "
                    "(olmopt keeps layer i at position i: no reordering, repetition or depth change)"
                )
        ranges.append(sources[0].layer_range)
        position = sources[0].layer_range[1]
    if position != n:
        raise InputError(f"slices: cover layers 0-{position - 1} of {n} (olmopt keeps the depth)")
    return ranges


def _passthrough_recipe(
    slices: list[tuple[list[_Source], dict[str, Any], str]], base: str, adapter: ArchitectureAdapter
) -> Recipe:
    n = adapter.num_layers
    ranges = _slice_ranges(slices, n)
    layers: dict[int, str] = {}
    for (sources, _, _), (a, b) in zip(slices, ranges, strict=True):
        layers.update({i: sources[0].model for i in range(a, b) if sources[0].model != base})
    first, last = slices[0][0][0].model, slices[-1][0][0].model
    units: dict[str, str] = {}
    boundary = None
    tail_units = (adapter.final_norm, *(() if adapter.tied_embeddings else (adapter.lm_head,)))
    if first == last and first != base:
        boundary = first
    else:
        if first != base:
            units[adapter.embed] = first
        if last != base:
            units.update({u: last for u in tail_units})
    return Recipe(base=base, boundary=boundary, layers=layers, units=units)


def _ps_recipe(
    spec: MethodSpec,
    slices: list[tuple[list[_Source], dict[str, Any], str]],
    top_params: dict[str, Any],
    base: str,
    variants: list[str],
    adapter: ArchitectureAdapter,
    seed: int = 0,
) -> Recipe:
    n = adapter.num_layers
    ranges = _slice_ranges(slices, n)
    per_layer: list[dict[str, Any]] = []
    for (sources, slice_params, key), (a, b) in zip(slices, ranges, strict=True):
        by_model = {src.model: src for src in sources}
        for index in range(b - a):
            t = layer_position(index, b - a)
            values: dict[str, Any] = {}
            for param in spec.params:

                def lookup(*scopes: tuple[dict[str, Any], str], param: Param = param, t: float = t) -> Any:
                    return _lookup(spec, param, t, scopes)

                top = (top_params, "parameters")
                piece = (slice_params, f"{key}.parameters")
                if param.name == "base_weight":  # linear: the base's own ``weight``, as mergekit reads it
                    src = by_model.get(base)
                    scopes = [(src.parameters, f"{src.key}.parameters")] if src else []
                    value = _lookup(spec, spec.param("weights"), t, [*scopes, piece, top])
                    if value is not None:
                        value = param.check_scalar(spec.name, value)
                elif param.per_variant:
                    found = [
                        lookup((by_model[v].parameters, f"{by_model[v].key}.parameters"), piece, top)
                        for v in variants
                    ]
                    value = None
                    if any(f is not None for f in found):
                        if param.default is None and None in found:
                            missing = variants[found.index(None)]
                            raise InputError(
                                f"{by_model[missing].key}.parameters.{param.name}: required (others set it)"
                            )
                        value = tuple(float(param.default if f is None else f) for f in found)  # type: ignore[arg-type]
                else:
                    value = lookup(piece, top)
                if value is not None:
                    values[param.name] = value
            per_layer.append(values)
    names = sorted({k for values in per_layer for k in values})
    params: dict[str, Any] = {}
    varying: dict[str, list[Any]] = {}
    defaults = make_params(spec.name).as_dict()
    for name in names:
        column = [
            values.get(name, _default(defaults[name], len(variants), spec.param(name).per_variant))
            for values in per_layer
        ]
        if all(v == column[0] for v in column):
            params[name] = column[0]
        else:
            varying[name] = column
    group = _group_size(list(varying.values()), n)
    layer_params = {
        k: tuple(col[g * group] for g in range(math.ceil(n / group))) for k, col in varying.items()
    }
    merge = ParamMerge(
        method=spec.name,
        base=base,
        models=tuple(variants),
        params=params,
        layer_params=layer_params,
        group_size=group if layer_params else 1,
        seed=seed,
    )
    recipe = Recipe(base=base, param_merge=merge)
    merge.check_layers(n)
    return recipe


def _lookup(spec: MethodSpec, param: Param, t: float, scopes: Sequence[tuple[dict[str, Any], str]]) -> Any:
    """The first scope's setting of ``param`` (by name or alias) at ``t``, validated; None when unset."""
    for scope, where in scopes:
        for name in (param.name, *param.aliases):
            if name in scope:
                value = evaluate_setting(scope[name], t, f"{where}.{name}")
                try:
                    return param.check_scalar(spec.name, value)
                except InputError as exc:
                    raise InputError(f"{where}.{name}: {exc}") from None
    return None


def _default(value: Any, count: int, per_variant: bool) -> Any:
    if per_variant and not isinstance(value, list | tuple):
        return (float(value),) * count
    return tuple(value) if isinstance(value, list) else value


def _group_size(columns: list[list[Any]], n: int) -> int:
    """The largest group size under which every column is constant on each group (1 = per layer)."""
    for size in range(n, 1, -1):
        if all(col[i] == col[(i // size) * size] for col in columns for i in range(n)):
            return size
    return 1


def write_mergekit_config(recipe: Recipe, model_dir: Path, path: Path) -> None:
    """Write the mergekit YAML of ``recipe`` (its architecture read from ``model_dir``/config.json)
    atomically to ``path``; NotExpressible when mergekit cannot express it (nothing written)."""
    import json
    import os
    from types import SimpleNamespace

    raw = json.loads((model_dir / "config.json").read_text())
    adapter = ArchitectureAdapter.from_config(SimpleNamespace(**raw), str(model_dir))
    config = recipe_to_mergekit(recipe, adapter)
    config["dtype"] = "float32"  # olmopt's maths; the output in the base's dtype
    out_dtype = raw.get("dtype") or raw.get("torch_dtype")
    if out_dtype in OUT_DTYPES:
        config["out_dtype"] = out_dtype
    text = mergekit_yaml(config, recipe)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
