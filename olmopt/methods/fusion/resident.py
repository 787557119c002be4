"""A Recipe's depth fusion on the resident model: applied on top of the patch and undone, or exported.

Swap and parameter-merge recipes are patched into the resident model (``olmopt.patch``); the fusion
steps of a Recipe are applied after that, in place, and restored exactly (``temporarily_fused``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from olmopt.methods.fusion.model import fuse_model, temporarily_fused
from olmopt.recipe import Recipe


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


def export_fused(patched_model: PreTrainedModel, recipe: Recipe, build_dir: Path) -> None:
    """Fuse ``patched_model`` (the recipe without its fusion, just patched) and save it to ``build_dir``."""
    fuse_model(patched_model, fusion_alphas(recipe))
    patched_model.save_pretrained(build_dir)
