"""Model identity in a campaign: two Recipes are the same model exactly when ``patch.model_key`` says so
(the same weights: ``layers={3: base}`` and no entry for layer 3 are one model; with the pool, by tensor
content, so two donors whose layer 3 holds the same weights are one model too).

Every "same model" question of the runner goes through :class:`ModelKeys` (reused metrics, the
incumbent among a stage's candidates, the incumbent's reference figures, held-out figures of a
repeated winner); Recipe JSON text is never compared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import Recipe
from olmopt.search.decision import Decision

if TYPE_CHECKING:
    from olmopt.pool.model_pool import ModelPool


class ModelKeys:
    """``patch.model_key`` of Recipes (by their JSON, cached) for one architecture."""

    def __init__(
        self, adapter: ArchitectureAdapter, param_names: list[str], pool: ModelPool | None = None
    ) -> None:
        self.adapter = adapter
        self.param_names = param_names
        self.pool = pool
        self._keys: dict[str, str] = {}  # Recipe JSON -> model_key

    def key_of_json(self, recipe_json: str) -> str:
        from olmopt.patch import model_key  # torch: only where trials are run

        if recipe_json not in self._keys:
            self._keys[recipe_json] = model_key(
                Recipe.from_json(recipe_json), self.adapter, self.param_names, self.pool
            )
        return self._keys[recipe_json]

    def same_json(self, a: str, b: str) -> bool:
        """Whether two Recipe JSON texts describe the same weights."""
        return a == b or self.key_of_json(a) == self.key_of_json(b)

    def same(self, a: Recipe, b: Recipe) -> bool:
        return self.same_json(a.to_json(), b.to_json())

    def earlier_decision(self, recipe: Recipe | None, decisions: Mapping[str, Decision]) -> Decision | None:
        """The latest of ``decisions`` (in stage order) whose Recipe is the same model as ``recipe``."""
        if recipe is None:
            return None
        for decision in reversed(list(decisions.values())):
            if self.same(decision.recipe, recipe):
                return decision
        return None
