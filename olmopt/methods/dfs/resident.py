"""A Recipe's data-flow path on the pool's resident models: evaluated in place, or exported.

The path runs on the resident layers of the pool models through ``DfsExecutor`` (a reused layer is
never copied); the Recipe names models by pool name, the executor takes them by position
(``DfsPath.indexed``).
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
from olmopt.methods.dfs.path import DfsPath
from olmopt.pool.model_pool import ModelPool


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


def dfs_eval_model(resident: ResidentPool, path: DfsPath) -> DfsEvalModel:
    """The Evaluator's view of a Recipe's path (models named by pool name) on the resident models."""
    models = resident.models()
    indexed = path.indexed(resident.pool.names)
    executor = DfsExecutor(models, indexed)
    output = models[indexed.output_index]
    return DfsEvalModel(executor, output.get_output_embeddings(), output.config)


def export_dfs(pool: ModelPool, path: DfsPath, build_dir: Path) -> None:
    """Write the folded model of a Recipe's path into ``build_dir`` (an existing empty temp dir)."""
    resident = ResidentPool(pool, torch.device("cpu"), torch.float32)
    export_path(
        resident.models(), path.indexed(pool.names), build_dir / "model", force=True,
        side_files_from=pool[str(path.input_model)].path,
    )  # fmt: skip
    for item in (build_dir / "model").iterdir():
        item.rename(build_dir / item.name)
    (build_dir / "model").rmdir()
