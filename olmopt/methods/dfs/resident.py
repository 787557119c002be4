"""Recipes that change the architecture (depth fusion, data-flow paths): evaluate and export them.

Swap and parameter-merge recipes are patched into the resident model (olmopt.patch). Fusion is
applied on top of that, in place and undone exactly (``temporarily_fused``). A data-flow path runs
on the resident layers of the pool models through ``DfsExecutor`` (a reused layer is never copied).
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
from olmopt.recipe import DataFlowPath, Recipe


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
    """Every pool model loaded once (for data-flow paths), in the compute dtype on one device."""

    def __init__(self, pool: ModelPool, device: torch.device, dtype: torch.dtype) -> None:
        self.pool = pool
        self.device = device
        self.dtype = dtype
        self._models: dict[str, PreTrainedModel] = {}

    def models(self) -> list[PreTrainedModel]:
        for name in self.pool.names:
            if name not in self._models:
                model = AutoModelForCausalLM.from_pretrained(self.pool[name].path, dtype=self.dtype)
                self._models[name] = model.to(self.device).eval().requires_grad_(False)  # type: ignore[arg-type]  # transformers types PreTrainedModel.to's wrapper wrongly
        return [self._models[n] for n in self.pool.names]


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


def dfs_eval_model(resident: ResidentPool, path: DataFlowPath) -> DfsEvalModel:
    models = resident.models()
    executor = DfsExecutor(models, dfs_path(path, resident.pool.names))
    output = models[resident.pool.names.index(path.output_model)]
    return DfsEvalModel(executor, output.get_output_embeddings(), output.config)


def export_architecture_recipe(
    pool: ModelPool, recipe: Recipe, build_dir: Path, patched_model: PreTrainedModel | None = None
) -> None:
    """Write the model of a fusion or data-flow recipe into ``build_dir`` (an existing empty temp dir)."""
    if recipe.dfs is not None:
        resident = ResidentPool(pool, torch.device("cpu"), torch.float32)
        export_path(
            resident.models(), dfs_path(recipe.dfs, pool.names), build_dir / "model", force=True,
            side_files_from=pool[recipe.dfs.input_model].path,
        )  # fmt: skip
        for item in (build_dir / "model").iterdir():
            item.rename(build_dir / item.name)
        (build_dir / "model").rmdir()
        return
    assert patched_model is not None
    fuse_model(patched_model, fusion_alphas(recipe))
    patched_model.save_pretrained(build_dir)
