"""A Recipe's data-flow path on the pool's resident models: evaluated in place, or exported.

The path runs on the resident layers of the pool models through ``DfsExecutor`` (a reused layer is
never copied); the Recipe names models by pool name, the executor takes them by position
(``DfsPath.indexed``). A path that names ``MERGE_DONOR`` also runs on the Recipe's parameter-space
merge, built once as a model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from olmopt.errors import InputError
from olmopt.methods.dfs.executor import DfsExecutor
from olmopt.methods.dfs.folded_model import export_path
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import MERGE_DONOR, ParamMerge, Recipe


class ResidentPool:
    """Every pool model loaded once (for data-flow paths), in the compute dtype on one device, and the
    parameter-space merge a path names (the last one asked for)."""

    def __init__(self, pool: ModelPool, device: torch.device, dtype: torch.dtype) -> None:
        self.pool = pool
        self.device = device
        self.dtype = dtype
        self._models: dict[str, PreTrainedModel] = {}
        self._merged: tuple[ParamMerge, PreTrainedModel] | None = None

    def names(self, recipe: Recipe) -> list[str]:
        """The model names a path of ``recipe`` indexes: the pool's, then ``MERGE_DONOR`` with a merge."""
        return [*self.pool.names, MERGE_DONOR] if recipe.param_merge is not None else list(self.pool.names)

    def models(self, recipe: Recipe) -> list[PreTrainedModel]:
        """The models of ``names(recipe)``, in that order."""
        for name in self.pool.names:
            if name not in self._models:
                self._models[name] = self._load(name)
        models = [self._models[n] for n in self.pool.names]
        merge = recipe.param_merge
        if merge is None:
            return models
        if self._merged is None or self._merged[0] != merge:
            self._merged = None  # free the previous merge before building the next
            self._merged = (merge, self._merge(merge))
        return [*models, self._merged[1]]

    def _load(self, name: str) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(self.pool[name].path, dtype=self.dtype)
        return model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]  # transformers' .to

    @torch.no_grad()
    def _merge(self, merge: ParamMerge) -> PreTrainedModel:
        """The merged model: its base's architecture, every parameter from the merge (the patcher's)."""
        from olmopt.patch import param_sources, source_tensor

        assert merge.base is not None  # filled in by Recipe validation
        model = self._load(merge.base)
        params = dict(model.named_parameters())
        sources = param_sources(Recipe(base=merge.base, param_merge=merge), self.pool.adapter, list(params))
        for name, param in params.items():
            param.copy_(source_tensor(self.pool, name, sources[name], self.dtype, self.device))
        return model


class DfsEvalModel(nn.Module):
    """Presents a ``DfsExecutor`` with the surface the Evaluator uses (teacher-forced and choice metrics)."""

    def __init__(self, executor: DfsExecutor, head: nn.Module, config: Any) -> None:
        super().__init__()
        self.executor = executor
        self.head = head
        self.config = config

    @property
    def base_model(self) -> Any:
        def run(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
            if "inputs_embeds" in kwargs or "past_key_values" in kwargs or "cache" in kwargs:
                raise InputError("data-flow paths support teacher-forced and multiple-choice metrics only")
            return SimpleNamespace(last_hidden_state=self.executor.hidden_states(input_ids, attention_mask))

        return run

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def dfs_eval_model(resident: ResidentPool, recipe: Recipe) -> DfsEvalModel:
    """The Evaluator's view of a Recipe's path (models named by pool name or ``MERGE_DONOR``) on the
    resident models."""
    assert recipe.dfs is not None
    models = resident.models(recipe)
    indexed = recipe.dfs.indexed(resident.names(recipe))
    executor = DfsExecutor(models, indexed)
    output = models[indexed.output_index]
    return DfsEvalModel(executor, output.get_output_embeddings(), output.config)


def export_dfs(pool: ModelPool, recipe: Recipe, build_dir: Path) -> None:
    """Write the folded model of a Recipe's path into ``build_dir`` (an existing empty temp dir)."""
    assert recipe.dfs is not None
    path = recipe.dfs
    resident = ResidentPool(pool, torch.device("cpu"), torch.float32)
    frame = str(path.input_model) if path.input_model != MERGE_DONOR else recipe.base
    export_path(
        resident.models(recipe), path.indexed(resident.names(recipe)), build_dir / "model", force=True,
        side_files_from=pool[frame].path,
    )  # fmt: skip
    for item in (build_dir / "model").iterdir():
        item.rename(build_dir / item.name)
    (build_dir / "model").rmdir()
