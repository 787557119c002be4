"""The depth-fusion decision as a joint stage: number of fusion steps and one alpha per step.

The seed's three alpha sources meet in one study: the MKA similarity baseline and the gradient fit
are enqueued as named trials, Bayesian optimisation (TPE, or GP via the sampler) proposes the rest.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from optuna.trial import Trial

from olmopt.recipe import Recipe
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace, planned
from olmopt.search.kind_registry import register_kind

if TYPE_CHECKING:
    from olmopt.config import StudyConfig
    from olmopt.pool.adapter import ArchitectureAdapter


def with_fusion(incumbent: Recipe, num_layers: int, alphas: list[float]) -> Recipe:
    from olmopt.methods.fusion.maths import fusion_steps  # torch: only where trials are decoded

    return incumbent.model_copy(update={"fusion": tuple(fusion_steps(num_layers, alphas))})


def calibration_items(env: SpaceEnv, limit: int) -> list[dict[str, Any]]:
    """Search-part items of the campaign's datasets (never the held-out part), up to ``limit``."""
    from olmopt.evaluate.datasets import load_examples, split_examples

    items: list[dict[str, Any]] = []
    for obj in env.context.objectives:
        if obj.kind in ("recipe", "lm_eval"):
            continue
        raw = json.loads(obj.path.read_text())
        keep = len(split_examples(load_examples(obj.path), obj.held_out, "search", None, obj.test))
        items.extend(raw[:keep])
    return items[:: max(1, len(items) // limit)][:limit]


def _texts(items: list[dict[str, Any]]) -> list[str]:
    out = []
    for item in items:
        if "conversation" in item:
            out.append(" ".join(t["value"] for t in item["conversation"]))
        else:
            out.append(f"{item['question']} " + " ".join(map(str, item["choices"])))
    return out


def fusion_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    assert incumbent is not None
    cfg = env.config.decisions.fusion
    num_layers = env.adapter.num_layers
    max_steps = min(cfg.max_steps, num_layers - 1)
    low, high = cfg.alpha_low, cfg.alpha_high

    def decode(trial: Trial) -> tuple[str, Recipe]:
        steps = trial.suggest_int("steps", 1, max_steps)
        alphas = [trial.suggest_float(f"alpha.{k}", low, high) for k in range(steps)]
        return f"#{trial.number}", with_fusion(incumbent, num_layers, alphas)

    enqueue: list[tuple[str, dict[str, object]]] = []
    if cfg.baselines:
        from olmopt.methods.fusion.calibrate import fit_alphas, mka_alphas  # torch

        ctx = env.context
        items = calibration_items(env, cfg.calibration_samples)
        tokenizer = ctx.evaluator.tokenizer
        with ctx.working.patched(incumbent):
            model = ctx.working.model
            sources = {
                "mka": lambda: mka_alphas(model, tokenizer, _texts(items), max_steps),
                "gradient": lambda: fit_alphas(model, tokenizer, items, max_steps),
            }
            for name in cfg.baselines:
                alphas = [min(high, max(low, a)) for a in sources[name]()]
                params: dict[str, object] = {
                    "steps": max_steps,
                    **{f"alpha.{k}": a for k, a in enumerate(alphas)},
                }
                enqueue.append((name, params))
    return StageSpace(decode=decode, enqueue=enqueue, budget=stage.n_trials)


class FusionKind(DecisionKind):
    """``decisions.fusion: joint``: depth fusion, after the donor and ES decisions."""

    stage_kinds = ("joint-fusion",)
    order = 90
    joint = True
    plots_trials = True
    report_plot = "pareto"

    def plan(self, config: StudyConfig, adapter: ArchitectureAdapter, param_names: list[str]) -> list[Stage]:
        d = config.decisions.fusion
        return [planned("joint-fusion", n_trials=d.n_trials)] if d.mode == "joint" else []

    def build(self, stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
        return fusion_space(stage, incumbent, env)


register_kind(FusionKind())
