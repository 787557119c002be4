"""Objective values across campaigns, keyed by model identity, data and evaluator settings.

A candidate's values depend only on its weights (``patch.model_key`` plus the identity of the pool's
checkpoint files), the data (each dataset file's sha256 and its split) and the evaluator's settings
(metrics, batch size, generation length, device type, dtype). ``EvalCache`` stores them in the campaign's
own database, so every worker and host of every campaign in that storage shares them: a campaign re-run
under a new name finds its candidates already scored. A changed dataset file, pool checkpoint or setting
changes the key: the old values are never read again. A candidate stopped early is stored too, marked
``partial`` with the per-item values it was scored on: a re-run replays its chunks from them and stops
where the first run stopped (or, with another reference, evaluates only the chunks they lack).

Why a table of its own (``olmopt_eval_cache``) and not a dedicated Optuna study: a lookup is one query on
the primary key, whereas Optuna reads a study's user attrs all at once and ``get_all_studies`` (every
``study status``, every listing) would read the whole cache each time; two workers writing the same key
cannot conflict (the first insert wins, and both values are the same); and deleting campaigns leaves it
alone. Journal storages (``journal:PATH``) have no database: they get no cache, and evaluate as before.
Campaigns with ``lm_eval`` objectives are not cached either (a task's documents have no single file hash).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, MetaData, String, Table, Text, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from olmopt.evaluate.datasets import file_digest
from olmopt.evaluate.item_scores import unpack
from olmopt.recipe import Recipe

if TYPE_CHECKING:
    from olmopt.search.context import EvalContext

CACHE_VERSION = 2  # bump when what a value means changes (a metric's definition); 2: per-item values
_METADATA = MetaData()
CACHE_TABLE = Table(
    "olmopt_eval_cache",
    _METADATA,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),  # JSON: {values: objective -> value, items: objective -> packed}
    Column(
        "campaign", String(512), nullable=False
    ),  # the campaign that evaluated it (for people reading the table)
)


def fingerprint(ctx: EvalContext) -> str | None:
    """What besides the weights decides a candidate's values (sha256); None when not cacheable."""
    if any(o.lm_eval is not None for o in ctx.objectives):
        return None
    ev = ctx.config.evaluation
    parts: dict[str, Any] = {
        "version": CACHE_VERSION,
        "evaluation": [ev.batch_size, ev.max_new_tokens, ev.stop_at_first_mismatch],
        "device": [ctx.working.device.type, str(ctx.working.dtype)],
        "objectives": [
            [
                o.name,
                o.metric,
                o.held_out,
                o.test,
                o.samples,
                file_digest(o.path) if o.kind != "recipe" else None,
            ]
            for o in sorted(ctx.objectives, key=lambda o: o.name)
        ],
        "pool": {name: _checkpoint_identity(model.path) for name, model in sorted(ctx.pool.models.items())},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _checkpoint_identity(path: Any) -> list[Any]:
    """A model directory's resolved path and its weight files' names, sizes and modification times
    (hashing gigabytes of weights per campaign would cost more than it saves)."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json"))
    return [str(path.resolve()), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


@dataclass(frozen=True)
class CacheHit:
    values: dict[str, float]
    campaign: str  # the campaign whose evaluation stored them
    items: dict[str, str] = field(default_factory=dict)  # objective -> packed per-item values
    partial: bool = False  # stopped early: ``values`` are over the items scored (replayed, never used whole)


class EvalCache:
    """Get and put one candidate's values for a split; every method is safe from several threads."""

    def __init__(self, engine: Engine, fingerprint: str, campaign: str) -> None:
        self.engine = engine
        self.fingerprint = fingerprint
        self.campaign = campaign
        self.hits = 0
        self._lock = threading.Lock()
        try:
            _METADATA.create_all(engine, checkfirst=True)
        except (OperationalError, ProgrammingError, IntegrityError):  # another worker created it meanwhile
            _METADATA.create_all(engine, checkfirst=True)

    def key(self, model_key: str, split: str) -> str:
        return hashlib.sha256(f"{self.fingerprint}|{split}|{model_key}".encode()).hexdigest()

    def get(self, model_key: str, split: str) -> CacheHit | None:
        column = CACHE_TABLE.c
        query = select(column.value, column.campaign).where(column.key == self.key(model_key, split))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        with self._lock:
            self.hits += 1
        data = json.loads(row[0])
        values = {name: float(v) for name, v in data["values"].items()}
        return CacheHit(values, str(row[1]), dict(data.get("items") or {}), bool(data.get("partial")))

    def put(
        self,
        model_key: str,
        split: str,
        values: Mapping[str, float],
        items: Mapping[str, str] | None = None,
        partial: bool = False,
    ) -> None:
        """Store finite values (a damaged model's NaN is re-evaluated, not cached) and the per-item values
        (``items``: objective -> packed, ``evaluate.item_scores``; selection's ties and replays need
        them). ``partial``: a candidate stopped early (its values over the items scored). The first
        complete writer wins; a partial entry is replaced by one with more items."""
        if not values or not all(math.isfinite(v) for v in values.values()):
            return
        key = self.key(model_key, split)
        value: dict[str, Any] = {"values": dict(values), "items": dict(items or {})}
        if partial:
            value["partial"] = True
        row = {"key": key, "value": json.dumps(value), "campaign": self.campaign}
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(CACHE_TABLE).values(**row))
        except IntegrityError:  # written by another worker or run (same values: evaluation is deterministic)
            self._extend(key, row, partial, _n_scored(value["items"]))

    def _extend(self, key: str, row: Mapping[str, str], partial: bool, n_items: int) -> None:
        """Replace a partial entry by ``row`` when ``row`` is complete or holds more items."""
        column = CACHE_TABLE.c
        with self.engine.begin() as conn:
            old = conn.execute(select(column.value).where(column.key == key)).first()
            if old is None:
                return
            data = json.loads(old[0])
            if data.get("partial") and (not partial or n_items > _n_scored(data.get("items") or {})):
                conn.execute(update(CACHE_TABLE).where(column.key == key).values(**row))


def _n_scored(items: Mapping[str, str]) -> int:
    """Items scored in an entry's packed per-item values, summed over objectives."""
    return sum(len(unpack(text)) for text in items.values())


def open_cache(storage: Any, ctx: EvalContext, campaign: str) -> EvalCache | None:
    """The cache of ``storage`` for ``ctx``'s settings; None for journal storages, lm-eval objectives, or
    ``evaluation.cache: false``."""
    engine = getattr(storage, "engine", None)
    if engine is None or not ctx.config.evaluation.cache:
        return None
    digest = fingerprint(ctx)
    return EvalCache(engine, digest, campaign) if digest is not None else None


def cached_scorer(
    cache: EvalCache | None, key_of: Callable[[Recipe], str], score: Callable[[Recipe, str], dict[str, float]]
) -> Callable[[Recipe, str], dict[str, float]]:
    """``score(recipe, split)`` that asks ``cache`` first and puts what it evaluates (held-out checks)."""
    if cache is None:
        return score

    def scored(recipe: Recipe, split: str) -> dict[str, float]:
        key = key_of(recipe)
        hit = cache.get(key, split)
        if hit is not None and not hit.partial:
            return hit.values
        values = score(recipe, split)
        cache.put(key, split, values)
        return values

    return scored
