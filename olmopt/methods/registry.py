"""The merge-method registry: the one place that knows a per-tensor merge method's facts.

A **method** is a pure per-tensor function registered with :func:`merge_method`::

    @merge_method("linear", params=(Param("weights", 1.0, per_variant=True, search=(0.0, 1.0)),))
    def linear(base, variants, p, *, seed, name, chunk_elems):
        ...

Contract of the function (checked for every registered method by ``olmopt.testing.methods``):

- ``base`` and ``variants`` (a list, highest priority first where order matters) are tensors of one
  shape; they are never modified (they may be read-only views of a file buffer or a shared cache).
- ``p`` maps every declared parameter to its validated value, defaults filled in; a ``per_variant``
  parameter is a tuple with one value per variant.
- The result has the base's shape and dtype. Maths in float32 (or float64 for whole-tensor sums).
- Memory stays bounded: work through ``chunk_elems``-sized pieces of the flattened tensors; a
  whole-tensor statistic is gathered in a first pass. The result is bit-identical for every
  ``chunk_elems``, thread count and processing order.
- Randomness, if any, comes from ``methods.delta.seeded_uniform`` keyed by ``(seed, name, variant index)``
  (declare ``stochastic=True``); a deterministic method ignores ``seed``.
- No Optuna, no files, no printing. Import torch inside the function, not at module level: the CLI
  and config validation read this registry, and ``olmopt --help`` must not load torch.

The registry derives from the declarations: config validation (``MergeDecision.methods``), the search
space of the ``merge`` decision (``search/kinds/merge.py``), the ``olmopt merge`` flags and parameter
validation (bounds, finiteness, per-variant lengths). Adding a method is one new module in
``olmopt/methods/delta/`` imported by that package's ``__init__``.

This module imports neither torch nor Optuna and reads no files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from olmopt.errors import InputError

Value = float | int | bool | tuple[float, ...] | None
# a whole-tensor merge: (base, variants, resolved params, *, seed, name, chunk_elems) -> merged tensor
TensorFunction = Callable[..., Any]

# subcommand names of ``olmopt merge`` that are not registered methods
RESERVED_NAMES = frozenset({"fuse", "dfs", "mergekit", "circuit-config"})


@dataclass(frozen=True)
class Param:
    """One declared parameter of a method.

    ``low``/``high`` bound accepted values (``low_open``/``high_open`` exclude the bound); ``search`` is
    the range the ``merge`` decision samples, ``(low, high)`` or ``(low, high, "log")``, or None (fixed
    at its default in searches). A ``per_variant`` parameter takes one value or one per variant.
    """

    name: str
    default: Value
    kind: Literal["float", "int", "bool"] = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    per_variant: bool = False
    search: tuple[float, float] | tuple[float, float, str] | None = None
    help: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The command-line flag generated for this parameter (``--base-droprate``)."""
        return "--" + self.name.replace("_", "-")

    def bounds_text(self) -> str:
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{lo}{low}, {high}{hi}"

    def check_scalar(self, method: str, value: Any) -> float | int | bool:
        """Validate and convert one value (one line naming method and parameter when bad)."""
        label = f"{method}: {self.name}"
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise InputError(f"{label} must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InputError(f"{label} must be a number, got {value!r}")
        if self.kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise InputError(f"{label} must be an integer, got {value!r}")
            value = int(value)
        number = float(value)
        if not math.isfinite(number):
            raise InputError(f"{label} must be finite, got {value!r}")
        below = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        above = self.high is not None and (number >= self.high if self.high_open else number > self.high)
        if below or above:
            raise InputError(f"{label} must be in {self.bounds_text()}, got {value!r}")
        return value if self.kind == "int" else number

    def check(self, method: str, value: Any) -> Value:
        """Validate a raw value: a scalar, or for ``per_variant`` a scalar or a list of scalars."""
        if value is None:
            if self.default is None:
                return None
            raise InputError(f"{method}: {self.name} needs a value")
        if isinstance(value, list | tuple):
            if not self.per_variant:
                raise InputError(f"{method}: {self.name} takes one value, got a list")
            if not value:
                raise InputError(f"{method}: {self.name} is an empty list")
            return tuple(float(self.check_scalar(method, v)) for v in value)
        return self.check_scalar(method, value)


@dataclass(frozen=True)
class SearchDim:
    """One dimension the ``merge`` decision samples: ``{method}.{name}`` over ``[low, high]``."""

    name: str
    low: float
    high: float
    log: bool = False
    kind: Literal["float", "int"] = "float"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, parameters and facts the search and the CLI need."""

    name: str
    function: TensorFunction
    params: tuple[Param, ...]
    summary: str
    stochastic: bool = False
    min_variants: int = 1
    max_variants: int | None = None
    priority_ordered: bool = False  # variants' order matters (searched as ``{method}.order``)
    aliases: tuple[str, ...] = ()
    # cross-parameter checks on resolved values (``p``, variant count); raise InputError
    check: Callable[[Mapping[str, Any], int], None] | None = None
    # explicit search dimensions and their mapping to parameter values (default: from ``Param.search``)
    search: tuple[SearchDim, ...] | None = None
    from_search: Callable[[Mapping[str, float]], dict[str, Any]] | None = None
    module: str = ""

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name or name in param.aliases:
                return param
        known = ", ".join(p.name for p in self.params) or "none"
        raise InputError(f"{self.name}: unknown parameter {name!r} (known: {known})")

    def defaults(self) -> dict[str, Value]:
        return {p.name: p.default for p in self.params}

    def check_count(self, count: int) -> None:
        """Refuse a variant count the method cannot take (SLERP with three models...)."""
        low, high = self.min_variants, self.max_variants
        if count >= low and (high is None or count <= high):
            return
        if high == low:
            want = f"exactly {low} variant{'s' if low != 1 else ''} ({low + 1} models with the base)"
        elif high is None:
            want = f"at least {low} variant{'s' if low != 1 else ''} ({low + 1} models with the base)"
        else:
            want = f"{low} to {high} variants"
        raise InputError(f"{self.name}: takes {want}, got {count} variant{'s' if count != 1 else ''}")

    def search_dims(self, count: int) -> list[SearchDim]:
        """The dimensions a search samples for ``count`` variants (names without the method prefix)."""
        if self.search is not None:
            return list(self.search)
        dims: list[SearchDim] = []
        for param in self.params:
            if param.search is None:
                continue
            low, high = float(param.search[0]), float(param.search[1])
            log = len(param.search) > 2 and param.search[2] == "log"
            kind: Literal["float", "int"] = "int" if param.kind == "int" else "float"
            if param.per_variant:
                dims.extend(SearchDim(f"{param.name}.{i}", low, high, log, kind) for i in range(count))
            else:
                dims.append(SearchDim(param.name, low, high, log, kind))
        return dims

    def params_from_search(self, values: Mapping[str, float], count: int) -> dict[str, Any]:
        """Parameter values (a plain dict for a Recipe) from sampled search values."""
        if self.from_search is not None:
            return self.from_search(values)
        out: dict[str, Any] = {}
        for param in self.params:
            if param.search is None:
                continue
            if param.per_variant:
                out[param.name] = tuple(float(values[f"{param.name}.{i}"]) for i in range(count))
            else:
                out[param.name] = values[param.name]
        return out


@dataclass(frozen=True)
class MethodParams:
    """Validated parameter values of one method (defaults filled in; per-variant values unresolved)."""

    method: str
    values: tuple[tuple[str, Value], ...] = field(default_factory=tuple)

    def __getitem__(self, key: str) -> Value:
        return dict(self.values)[key]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.values}

    def resolve(self, count: int) -> dict[str, Any]:
        """Values for ``count`` variants: per-variant scalars broadcast, list lengths checked."""
        spec = get_method(self.method)
        spec.check_count(count)
        out: dict[str, Any] = {}
        for param in spec.params:
            value = dict(self.values)[param.name]
            if param.per_variant and value is not None:
                if isinstance(value, tuple):
                    if len(value) != count:
                        raise InputError(
                            f"{self.method}: {param.name} has {len(value)} values for {count} variants"
                        )
                else:
                    value = (float(value),) * count
            out[param.name] = value
        if spec.check is not None:
            spec.check(out, count)
        return out


_METHODS: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    summary: str = "",
    stochastic: bool = False,
    min_variants: int = 1,
    max_variants: int | None = None,
    priority_ordered: bool = False,
    aliases: Sequence[str] = (),
    check: Callable[[Mapping[str, Any], int], None] | None = None,
    search: Sequence[SearchDim] | None = None,
    from_search: Callable[[Mapping[str, float]], dict[str, Any]] | None = None,
) -> Callable[[TensorFunction], TensorFunction]:
    """Register the decorated per-tensor function as merge method ``name`` (see the module docstring)."""

    def decorate(function: TensorFunction) -> TensorFunction:
        spec = MethodSpec(
            name=name,
            function=function,
            params=tuple(params),
            summary=summary or _first_line(function.__doc__),
            stochastic=stochastic,
            min_variants=min_variants,
            max_variants=max_variants,
            priority_ordered=priority_ordered,
            aliases=tuple(aliases),
            check=check,
            search=tuple(search) if search is not None else None,
            from_search=from_search,
            module=getattr(function, "__module__", ""),
        )
        register(spec)
        return function

    return decorate


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def register(spec: MethodSpec) -> None:
    """Add ``spec`` to the registry; a name, alias or flag clash is a programming error."""
    if not spec.name.replace("_", "").isalnum() or spec.name != spec.name.lower():
        raise ValueError(f"merge method name {spec.name!r}: use lower-case letters, digits and _")
    if spec.name in RESERVED_NAMES:
        raise ValueError(f"merge method name {spec.name!r} is reserved for another `olmopt merge` command")
    for taken in (spec.name, *spec.aliases):
        owner = _METHODS.get(taken) or _METHODS.get(_ALIASES.get(taken, ""))
        if owner is not None and owner.module != spec.module:
            raise ValueError(f"merge method {taken!r} is already registered by {owner.module}")
    names = [p.name for p in spec.params]
    if len(set(names)) != len(names) or "seed" in names:
        raise ValueError(f"merge method {spec.name!r}: duplicate parameter names or a 'seed' parameter")
    for param in spec.params:
        if param.default is not None:
            param.check(spec.name, param.default)
        if param.search is not None:
            for bound in param.search[:2]:
                param.check_scalar(spec.name, bound)
    _METHODS[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name


def unregister(name: str) -> None:
    """Remove a method (tests that register toy methods clean up with this)."""
    spec = _METHODS.pop(name, None)
    if spec is not None:
        for alias in spec.aliases:
            _ALIASES.pop(alias, None)


def canonical_name(method: str) -> str:
    """The registered name for ``method`` or one of its aliases (InputError when unknown)."""
    if method in _METHODS:
        return method
    if method in _ALIASES:
        return _ALIASES[method]
    raise InputError(f"unknown merge method {method!r} (choose from {', '.join(sorted(_METHODS))})")


def get_method(method: str) -> MethodSpec:
    return _METHODS[canonical_name(method)]


def registered() -> dict[str, MethodSpec]:
    """Every registered method by name (a copy)."""
    return dict(_METHODS)


def make_params(method: str, values: Mapping[str, Any] | None = None) -> MethodParams:
    """Validate raw values (YAML, CLI, a Recipe) for ``method``; defaults fill the rest.

    Aliases of parameter names are accepted (``meaningful_change_threshold``, ``weight``), and
    ``skip_rescaling: true`` means ``rescale: false``.
    """
    spec = get_method(method)
    out = spec.defaults()
    for raw_key, raw_value in (values or {}).items():
        key, value = str(raw_key), raw_value
        if key == "skip_rescaling" and any(p.name == "rescale" for p in spec.params):
            if not isinstance(value, bool):
                raise InputError(f"{spec.name}: skip_rescaling must be true or false, got {value!r}")
            key, value = "rescale", not value
        param = spec.param(key)
        out[param.name] = param.check(spec.name, value)
    return MethodParams(spec.name, tuple((p.name, out[p.name]) for p in spec.params))


def per_variant_names(specs: Iterable[MethodSpec]) -> set[str]:
    """Names (and aliases) of per-variant parameters among ``specs``."""
    return {n for s in specs for p in s.params if p.per_variant for n in (p.name, *p.aliases)}
