"""The parameter-space merge decision (Circuit-Merge, DELLA, task arithmetic) as a joint stage.

Searched jointly: the method, its knobs (conditional on the method), the variants' priority order and
the random seed. Two known-good points are enqueued first: task arithmetic at lambda = 1/n and
Circuit-Merge at the original script's defaults.
"""

from __future__ import annotations

import itertools

from optuna.trial import Trial

from olmopt.recipe import ParamMerge, Recipe
from olmopt.search.plan import Stage
from olmopt.search.spaces import SpaceEnv, StageSpace, register_space

MAX_ORDERS = 24  # orders searched as one categorical; beyond 4 variants the given order is kept


def variants_of(env: SpaceEnv, base: str) -> list[str]:
    chosen = env.config.decisions.merge.models
    return list(chosen) if chosen else [m for m in env.pool_names if m != base]


def orders(n: int, search: bool) -> list[str]:
    perms = list(itertools.permutations(range(n))) if search else [tuple(range(n))]
    if len(perms) > MAX_ORDERS:
        perms = [tuple(range(n))]
    return [",".join(map(str, p)) for p in perms]


def merge_space(stage: Stage, incumbent: Recipe | None, env: SpaceEnv) -> StageSpace:
    assert incumbent is not None
    cfg = env.config.decisions.merge
    base = incumbent.base
    variants = variants_of(env, base)
    order_choices = orders(len(variants), cfg.search_order)

    def decode(trial: Trial) -> tuple[str, Recipe]:
        method = str(trial.suggest_categorical("method", list(cfg.methods)))
        seed = 0
        if method == "circuit":
            params: dict[str, float | int | bool | str] = {
                "temperature": trial.suggest_float("circuit.temperature", 0.0, 1.0),
                "base_droprate": trial.suggest_float("circuit.base_droprate", 0.05, 0.9),
                "threshold": trial.suggest_float("circuit.threshold", 1e-8, 1e-4, log=True),
            }
            order = [int(i) for i in str(trial.suggest_categorical("circuit.order", order_choices)).split(",")]
            seed = trial.suggest_int("circuit.seed", 0, 1023)
        elif method == "della":
            density = trial.suggest_float("della.density", 0.2, 1.0)
            room = min(density, 1.0 - density)
            params = {
                "density": density,
                "epsilon": trial.suggest_float("della.epsilon_share", 0.0, 0.95) * room,
                "lambda": trial.suggest_float("della.lambda", 0.1, 1.5),
            }
            order = list(range(len(variants)))
            seed = trial.suggest_int("della.seed", 0, 1023)
        else:
            params = {"lambda": trial.suggest_float("task_arithmetic.lambda", 0.05, 1.0)}
            order = list(range(len(variants)))
        merge = ParamMerge(method=method, base=base, models=tuple(variants[i] for i in order), params=params, seed=seed)
        return f"#{trial.number}", Recipe(base=base, param_merge=merge)

    enqueue: list[tuple[str, dict[str, object]]] = []
    if "task_arithmetic" in cfg.methods:
        enqueue.append(("task_arithmetic@1/n", {"method": "task_arithmetic", "task_arithmetic.lambda": 1.0 / len(variants)}))
    if "circuit" in cfg.methods:
        defaults = {"circuit.temperature": 0.0, "circuit.base_droprate": 0.5, "circuit.threshold": 2e-6}
        enqueue.append(("circuit@defaults", {"method": "circuit", **defaults, "circuit.order": order_choices[0], "circuit.seed": 0}))
    return StageSpace(decode=decode, enqueue=enqueue, budget=stage.n_trials)


register_space("joint-merge", merge_space)
