"""Apply a Recipe to the resident working model in place, undo it bit-exactly, or materialise it.

The working model is loaded once (from the pool's first base) and stays on its device. A candidate is
applied by copying only the tensors whose *source* differs from what the live parameter holds now, and
undone by copying the saved values back. Models are never reloaded or deep-copied per candidate.

A parameter's source is ``(donor, es_steps)``: which pool model supplies it and which replayable ES
steps were applied on top. Sources are derived from the Recipe by ``param_sources`` (pure).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from olmopt.errors import InputError
from olmopt.methods.es.maths import apply_es_steps
from olmopt.pool.adapter import ArchitectureAdapter, unit_of
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import MERGE_DONOR, EsStep, ParamMerge, Recipe
from olmopt.runtime import compute_dtype, pick_device, quiet_transformers

Source = tuple[str | ParamMerge, tuple[EsStep, ...]]
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
}


def param_sources(recipe: Recipe, adapter: ArchitectureAdapter, param_names: list[str]) -> dict[str, Source]:
    """Which donor (a pool model, or the recipe's parameter-space merge) and ES steps feed each parameter."""
    if recipe.fusion or recipe.dfs:
        raise InputError(
            "recipe: fusion and data-flow paths change the architecture; they are not patched in place"
        )
    es_by_param: dict[str, list[EsStep]] = {}
    for step in recipe.es:
        es_by_param.setdefault(step.unit + ".weight", []).append(step)
    boundary_units = set(adapter.boundary_units()) | {adapter.lm_head}
    sources: dict[str, Source] = {}
    for name in param_names:
        unit = unit_of(name)
        donor: str | ParamMerge = recipe.param_merge or recipe.base
        if recipe.boundary and unit in boundary_units:
            donor = recipe.boundary
        layer = adapter.layer_of(name)
        if layer is not None and layer in recipe.layers:
            donor = recipe.layers[layer]
        donor = recipe.units.get(unit, donor)
        if donor == MERGE_DONOR:
            if recipe.param_merge is None:
                raise InputError(
                    f"recipe: donor {MERGE_DONOR!r} names the parameter-space merge, but param_merge is not "
                    "set"
                )
            donor = recipe.param_merge
        sources[name] = (donor, tuple(es_by_param.get(name, ())))
    return sources


def model_key(
    recipe: Recipe, adapter: ArchitectureAdapter, param_names: list[str], pool: ModelPool | None = None
) -> str:
    """A key equal for two Recipes exactly when they describe the same weights.

    ``layers={3: base}`` and no entry for layer 3 give the same key. With ``pool`` a pool model's tensor
    is named by its content (``ModelPool.digest``), so donors whose layer holds the same weights give the
    same key (a layer specialist trained in its own layers only carries its base's elsewhere); without
    it, by the donor's name. Recipes that change the architecture (fusion, data-flow paths) are keyed by
    their JSON.
    """
    if recipe.fusion or recipe.dfs:
        return "json:" + recipe.to_json()
    sources = param_sources(recipe, adapter, param_names)
    if pool is None:
        text = repr(sorted((name, repr(source)) for name, source in sources.items()))
        return "sources:" + hashlib.sha256(text.encode()).hexdigest()
    named = {
        name: (pool.digest(donor, name) if isinstance(donor, str) else repr(donor), repr(steps))
        for name, (donor, steps) in sources.items()
    }
    return "content:" + hashlib.sha256(repr(sorted(named.items())).encode()).hexdigest()


def shared_prefix_depth(
    old: Recipe, new: Recipe, adapter: ArchitectureAdapter, param_names: list[str]
) -> int:
    """The deepest layer k whose input (and every earlier layer's) is the same under both Recipes.

    -1 when the embedding differs; ``num_layers`` when no layer differs. Prefix-cache captures of
    layers <= k taken under ``old`` stay valid under ``new``.
    """
    if old.fusion or old.dfs or new.fusion or new.dfs:
        return -1
    a, b = param_sources(old, adapter, param_names), param_sources(new, adapter, param_names)
    depth = adapter.num_layers
    for name in param_names:
        if a[name] == b[name]:
            continue
        layer = adapter.layer_of(name)
        if layer is not None:
            depth = min(depth, layer)
        elif unit_of(name) == adapter.embed:
            return -1
    return depth


def source_tensor(
    pool: ModelPool, name: str, source: Source, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The value of parameter ``name`` under ``source``, in ``dtype`` on ``device``."""
    donor, steps = source
    if steps:
        key = (id(pool), name, repr(source), dtype, str(device))
        cached = _ES_CACHE.get(key)
        if cached is None:
            cached = apply_es_steps(source_tensor(pool, name, (donor, ()), dtype, device), steps)
            _ES_CACHE[key] = cached
            if len(_ES_CACHE) > ES_CACHE_ENTRIES:
                _ES_CACHE.popitem(last=False)
        return cached
    if isinstance(donor, ParamMerge):
        return merged_tensor(pool, name, donor).to(device=device, dtype=dtype)
    return pool.tensor(donor, name).to(device=device, dtype=dtype)


# ES replays recompute an SVD per step; keep the last few replayed tensors (one stage's parents).
ES_CACHE_ENTRIES = 8
_ES_CACHE: OrderedDict[tuple[object, ...], torch.Tensor] = OrderedDict()


def merged_tensor(pool: ModelPool, name: str, merge: ParamMerge) -> torch.Tensor:
    """One tensor of a parameter-space merge: the base against ``merge.models`` (highest priority first)."""
    from olmopt.methods.delta import make_params, merge_tensor

    base_name = merge.base or ""
    base = pool.tensor(base_name, name).float().clone()  # clones: pool tensors are a shared read-only cache
    variants = [pool.tensor(m, name).float().clone() for m in merge.models]
    params = make_params(merge.method, merge.params_at(pool.adapter.merge_layer(name)))
    return merge_tensor(merge.method, base, variants, params, merge.seed, pool.adapter.storage_name(name))


@dataclass
class PatchHandle:
    """What ``WorkingModel.apply`` changed, so ``undo`` can put it back bit for bit."""

    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    old_sources: dict[str, Source] = field(default_factory=dict)


class WorkingModel:
    """A resident causal LM that takes Recipes by in-place patching."""

    def __init__(self, pool: ModelPool, base: str, device: str | None = None) -> None:
        quiet_transformers()
        self.pool = pool
        self.device = pick_device(device)
        self.dtype = compute_dtype(self.device)
        self.model = AutoModelForCausalLM.from_pretrained(pool[base].path, dtype=self.dtype)
        self.model.to(self.device).eval()  # type: ignore[arg-type]  # transformers types PreTrainedModel.to's wrapper wrongly
        self.model.requires_grad_(False)
        self.adapter = pool.adapter
        self.params = dict(self.model.named_parameters())
        self.param_names = list(self.params)
        self.units = self.adapter.all_units(self.param_names)
        self.sources: dict[str, Source] = {name: (base, ()) for name in self.param_names}
        self.recipe = Recipe(base=base)

    def validate(self, recipe: Recipe) -> None:
        recipe.validate_against(self.pool.names, self.adapter.num_layers, self.units)

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> PatchHandle:
        """Patch ``recipe`` in; returns the handle that undoes it."""
        self.validate(recipe)
        wanted = param_sources(recipe, self.adapter, self.param_names)
        handle = PatchHandle()
        try:
            for name, source in wanted.items():
                if self.sources[name] == source:
                    continue
                param = self.params[name]
                value = source_tensor(self.pool, name, source, self.dtype, self.device)
                handle.saved[name] = param.detach().clone()
                handle.old_sources[name] = self.sources[name]
                param.copy_(value)
                self.sources[name] = source
        except BaseException:
            self.undo(handle)
            raise
        handle.old_sources["__recipe__"] = self.recipe  # type: ignore[assignment]
        self.recipe = recipe
        return handle

    @torch.no_grad()
    def undo(self, handle: PatchHandle) -> None:
        """Restore exactly what ``apply`` overwrote."""
        for name, value in handle.saved.items():
            self.params[name].copy_(value)
            self.sources[name] = handle.old_sources[name]
        previous = handle.old_sources.get("__recipe__")
        if previous is not None:
            self.recipe = previous  # type: ignore[assignment]
        handle.saved.clear()

    @contextmanager
    def patched(self, recipe: Recipe) -> Iterator[None]:
        """Apply ``recipe`` for the duration of a ``with`` block."""
        handle = self.apply(recipe)
        try:
            yield
        finally:
            self.undo(handle)


def materialize(
    pool: ModelPool, recipe: Recipe, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(checkpoint tensor name, tensor)`` of the merged model, in the base checkpoint's layout."""
    base = pool[recipe.base].checkpoint
    names = base.keys()
    if recipe.param_merge is not None:
        recipe.param_merge.check_layers(pool.adapter.num_layers)
    sources = param_sources(recipe, pool.adapter, names)
    cpu = torch.device("cpu")
    for name in names:
        out_dtype = dtype or SAFETENSORS_DTYPES[base.dtype_name(name)]
        yield name, source_tensor(pool, name, sources[name], out_dtype, cpu)
