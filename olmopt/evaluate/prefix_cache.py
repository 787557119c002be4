"""The prefix activation cache: hidden states entering layer i, so a candidate that differs from the
incumbent only in layers >= i runs just layers i..N.

Mechanics: ``capture`` (one forward pass stores the input of every layer from i on, within
``max_bytes``, starting from the deepest stored input that is still valid), ``use_layer`` (switch
layers without a pass), ``adopt``/``hold`` (take over inputs captured elsewhere), ``carry_layers``.
Policy (``before``/``after``, what ``search.context.EvalContext.score`` calls around one evaluation):
the cache follows the incumbent. A candidate's kept later-layer inputs are adopted when it becomes the
incumbent, a layer-0 stage holds them for later stages, captures below a change stay valid
(``patch.shared_prefix_depth``), and a capture pass starts from the deepest valid input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from olmopt.evaluate.datasets import Split

if TYPE_CHECKING:
    from olmopt.evaluate.engine import BatchKey, Evaluator, PrefixStore
    from olmopt.pool.adapter import ArchitectureAdapter
    from olmopt.recipe import Recipe


@dataclass(frozen=True)
class PrefixUse:
    """How one evaluation uses the cache: run from the cached layer (``use``), keep inputs of ``carry``."""

    use: bool = False
    carry: list[int] = field(default_factory=list)


class PrefixCache:
    """The captured inputs of one evaluator's teacher-forced batches under the incumbent's weights."""

    def __init__(
        self,
        evaluator: Evaluator,
        adapter: ArchitectureAdapter,
        param_names: list[str],
        max_bytes: int = 1 << 30,
    ) -> None:
        self.evaluator = evaluator
        self.adapter = adapter
        self.param_names = param_names
        self.max_bytes = max_bytes
        self.store: PrefixStore = {}  # batch key -> layer -> input hidden states
        self.layer: int | None = None  # the layer evaluations start from (None: full forwards)
        self._recipe: Recipe | None = None  # the incumbent whose hidden states the store holds
        self._carried: dict[str, PrefixStore] = {}  # candidate digest -> inputs of the layers after its own
        self._carried_bytes = 0

    # -- mechanics -------------------------------------------------------------------------------------
    def inputs(self, key: BatchKey) -> torch.Tensor | None:
        """The stored input of the current layer for one batch (None: run the batch in full)."""
        entry = self.store.get(key) if self.layer else None
        return entry[self.layer] if entry is not None and self.layer is not None else None

    @torch.no_grad()
    def capture(self, layer: int, split: Split = "search", start: PrefixStore | None = None) -> None:
        """Store the hidden states entering ``layer`` under the current (incumbent) weights.

        One forward pass captures the input of every layer from ``layer`` on when that fits in
        ``max_bytes``, so later stages with the same incumbent switch layers with ``use_layer``.
        ``start``: stored inputs of earlier layers that the caller guarantees are still valid (the
        weights below them are unchanged); each batch's pass then starts at the deepest of them.
        """
        start = dict(start or {})  # may be this cache's own store, cleared next
        self.clear()
        if layer <= 0:
            return
        ev = self.evaluator
        num_layers = ev.num_layers
        per_layer = self.bytes_per_layer(split)
        layers = (
            list(range(layer, num_layers)) if per_layer * (num_layers - layer) <= self.max_bytes else [layer]
        )
        for key, batch in ev.forced_batches(split):
            if key not in self.store:
                self.store[key] = ev.capture_inputs(batch, layers, start.get(key))
        self.layer = layer

    def use_layer(self, layer: int) -> bool:
        """Switch to another captured layer without a new forward pass; False when it was not captured."""
        if not self.store or any(layer not in entry for entry in self.store.values()):
            return False
        self.layer = layer
        return True

    def adopt(self, store: PrefixStore, layer: int) -> bool:
        """Use ``store`` (captures under the weights the caller
        now guarantees) from ``layer``; False if absent."""
        if not store or any(layer not in entry for entry in store.values()):
            return False
        self.store, self.layer = store, layer
        return True

    def hold(self, store: PrefixStore) -> None:
        """Keep ``store`` (captures under the current weights) without using it yet: no prefix layer."""
        self.store, self.layer = store, None

    def carry_layers(self, layer: int, budget: int) -> list[int]:
        """Layers after ``layer`` whose inputs a prefix-cached evaluation can keep within ``budget`` bytes."""
        per_layer = self.bytes_per_layer("search")
        later = list(range(layer + 1, self.evaluator.num_layers))
        if per_layer * len(later) <= budget:
            return later
        return later[:1] if later and per_layer <= budget else []

    def bytes_per_layer(self, split: Split) -> int:
        """Bytes of one layer's input hidden states over every teacher-forced batch of ``split``."""
        ev = self.evaluator
        tokens = sum(batch.ids.numel() for _key, batch in ev.forced_batches(split))
        dtype = next(ev.model.parameters()).dtype
        return tokens * ev.hidden_size * torch.empty((), dtype=dtype).element_size()

    def clear(self) -> None:
        self.store = {}
        self.layer = None

    # -- policy: the cache follows the incumbent ------------------------------------------------------
    def before(self, recipe: Recipe, incumbent: Recipe | None, layer: int | None, split: str) -> PrefixUse:
        """Ready the cache for evaluating ``recipe`` in a stage at ``layer`` under ``incumbent`` (the
        resident weights are the incumbent's). Outside a stage (no incumbent or layer, held-out, fusion)
        the evaluation runs in full and keeps nothing."""
        if incumbent is None or layer is None or split != "search" or recipe.fusion:
            return PrefixUse()
        if layer:
            self._switch(incumbent, layer)
        elif self._recipe != incumbent:  # a layer-0 stage: nothing to reuse, but hold what was kept
            self.hold(self._take_carried(incumbent) or {})
            self._recipe = incumbent
        room = self.max_bytes - self._carried_bytes
        return PrefixUse(bool(layer), self.carry_layers(layer, room // 2))  # later candidates get room too

    def after(self, recipe: Recipe, plan: PrefixUse, carried: PrefixStore) -> None:
        """Remember the inputs that evaluating ``recipe`` kept (for when it becomes the incumbent)."""
        if not carried:
            return
        below = self.store if plan.use else {}
        layer = self.layer if plan.use else None
        self._carried_bytes += sum(
            t.numel() * t.element_size() for entry in carried.values() for t in entry.values()
        )
        self._carried[recipe.digest()] = {
            key: {**{k: v for k, v in below.get(key, {}).items() if layer is not None and k <= layer}, **kept}
            for key, kept in carried.items()
        }

    def _take_carried(self, incumbent: Recipe) -> PrefixStore | None:
        """The inputs kept when ``incumbent`` was a candidate; the other candidates' are dropped."""
        carried = self._carried.pop(incumbent.digest(), None)
        self._carried.clear()
        self._carried_bytes = 0
        return carried

    def _switch(self, incumbent: Recipe, layer: int) -> None:
        """Make the cache hold ``incumbent``'s hidden states entering ``layer``.

        In order of cost: the captures it holds (same incumbent, or one that differs only in later
        layers: an ES step, a later unit); the inputs kept when ``incumbent`` was evaluated as a
        candidate of the previous stage; a capture pass from the deepest input that is still valid (the
        embedding when none is).
        """
        from olmopt.patch import shared_prefix_depth

        if self._recipe != incumbent:
            old, store = self._recipe, self.store
            depth = -1 if old is None else shared_prefix_depth(old, incumbent, self.adapter, self.param_names)
            valid = {key: {k: v for k, v in entry.items() if k <= depth} for key, entry in store.items()}
            carried = self._take_carried(incumbent)
            if not self.adopt(carried if carried is not None else valid, layer):
                self.capture(layer, "search", start=valid)  # from the deepest valid input
            self._recipe = incumbent
        elif not self.use_layer(layer):
            self.capture(layer, "search", start=self.store)
