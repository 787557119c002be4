"""Recipes that change the architecture (depth fusion, data-flow paths): evaluate and export them.

Swap and parameter-merge recipes are patched into the resident model (olmopt.patch). Fusion is
applied on top of that, in place and undone exactly (``temporarily_fused``). A data-flow path runs
on the resident layers of the pool models through ``DfsExecutor`` (a reused layer is never copied); a
path that names ``MERGE_DONOR`` also runs on the Recipe's parameter-space merge, built once as a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from olmopt.dfs import DfsExecutor, export_path
from olmopt.errors import InputError
from olmopt.fusion import fuse_model, temporarily_fused
from olmopt.ops.dfs import DfsPath
from olmopt.pool.model_pool import ModelPool
from olmopt.recipe import MERGE_DONOR, DataFlowPath, ParamMerge, Recipe


def fusion_alphas(recipe: Recipe) -> list[float]:
    return [step.alpha for step in recipe.fusion]


def without_fusion(recipe: Recipe) -> Recipe:
    return recipe.model_copy(update={"fusion": ()}) if recipe.fusion else recipe


@contextmanager
def fused(model: nn.Module, recipe: Recipe) -> Iterator[nn.Module]:
    """The resident model with the recipe's fusion steps applied for the ``with`` block."""
    if not recipe.fusion:
        yield model
        return
    with temporarily_fused(model, fusion_alphas(recipe)) as out:
        yield out


def layers_removed(recipe: Recipe, num_layers: int) -> float:
    if recipe.dfs is not None:
        return float(num_layers - len(recipe.dfs.hops))
    return float(len(recipe.fusion))


def dfs_path(path: DataFlowPath, names: list[str]) -> DfsPath:
    """A Recipe's named path as the executor's indexed path over ``names``."""
    index = {n: i for i, n in enumerate(names)}
    return DfsPath(
        hops=tuple((index[m], layer) for m, layer in path.hops),
        scales=path.scales,
        input_model=index[path.input_model],
        output_model=index[path.output_model],
    )


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
    assert recipe.dfs is not None
    models, names = resident.models(recipe), resident.names(recipe)
    executor = DfsExecutor(models, dfs_path(recipe.dfs, names))
    output = models[names.index(recipe.dfs.output_model)]
    return DfsEvalModel(executor, output.get_output_embeddings(), output.config)


def export_architecture_recipe(
    pool: ModelPool, recipe: Recipe, build_dir: Path, patched_model: PreTrainedModel | None = None
) -> None:
    """Write the model of a fusion or data-flow recipe into ``build_dir`` (an existing empty temp dir)."""
    if recipe.dfs is not None:
        resident = ResidentPool(pool, torch.device("cpu"), torch.float32)
        frame = recipe.dfs.input_model if recipe.dfs.input_model != MERGE_DONOR else recipe.base
        export_path(
            resident.models(recipe), dfs_path(recipe.dfs, resident.names(recipe)), build_dir / "model",
            force=True, side_files_from=pool[frame].path,
        )  # fmt: skip
        for item in (build_dir / "model").iterdir():
            item.rename(build_dir / item.name)
        (build_dir / "model").rmdir()
        return
    assert patched_model is not None
    fuse_model(patched_model, fusion_alphas(recipe))
    patched_model.save_pretrained(build_dir)
