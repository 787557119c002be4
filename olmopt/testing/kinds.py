"""Conformance kit for decision kinds (as optuna keeps ``optuna/testing``): ``check_kind(kind, env)``.

Runs the contract of ``olmopt.search.kind.DecisionKind`` against one registered kind, for the stages
it plans from ``env.config``, and raises ``AssertionError`` naming the kind, the stage and the broken
rule:

- ``plan`` is deterministic, plans only the kind's own ``stage_kinds`` and plans at least one stage
  for the config given (a kit run that checks nothing is an error);
- ``build`` is deterministic: the same enqueued labels and params on every call (any worker may
  enqueue), labels unique;
- every enqueued point decodes to a valid Recipe (donors in the pool, layers and units that exist,
  JSON round trip), reads only the params it fixes, and decodes to the same Recipe again;
- the budget is the planned one (a joint kind: ``budget == stage.n_trials > 0``; others: None, or a
  positive budget), and trials the sampler adds beyond the enqueued ones decode to valid Recipes,
  the same for the same params. (The runner stops asking the sampler at ``budget`` evaluations, but
  evaluates every enqueued point: a warm start larger than the budget is spent in full.)
- ``decide`` and ``details`` are deterministic functions of the stage's finished trials (checked on
  trials with made-up metrics) and ``decide`` names a trial's label or None; ``details`` is JSON.

``check_all(env)`` runs it over every registered kind that plans a stage for the config. Nothing here
evaluates a model; ``build`` may (a kind that computes starting points from the resident model), so pass
an ``env`` with a context.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from olmopt.pool.adapter import ArchitectureAdapter
from olmopt.recipe import Recipe
from olmopt.search.kind import DecisionKind, SpaceEnv, Stage, StageSpace
from olmopt.search.kinds import get_kind, registered

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial, Trial

    from olmopt.config import StudyConfig
    from olmopt.search.decision import Decision


@dataclass
class NamesEnv:
    """A ``SpaceEnv`` of names only: the config, the pool's names, an architecture (a 4-layer llama unless
    given) and earlier decisions, with no resident model or pool on disk: enough for kinds whose spaces
    are built from names (swap, joint, merge), not for those that evaluate while building."""

    config: StudyConfig
    pool_names: list[str]
    adapter: ArchitectureAdapter = field(default_factory=lambda: ArchitectureAdapter("llama", 4, False))
    param_names: list[str] = field(default_factory=list)
    context: Any = None
    pool: Any = None
    decisions: dict[str, Decision] = field(default_factory=dict)


def _fail(kind: DecisionKind, stage: Stage | None, rule: str) -> AssertionError:
    where = f" stage {stage.key}" if stage is not None else ""
    return AssertionError(f"decision kind {kind!r}{where}: {rule}")


def _decode(space: StageSpace, params: dict[str, Any] | None, seed: int = 0) -> tuple[str, Recipe, Trial]:
    """Decode one trial of a throw-away in-memory study: the enqueued ``params``, or a sampled point."""
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    if params is not None:
        study.enqueue_trial(params)
    trial = study.ask()
    label, recipe = space.decode(trial)
    return label, recipe, trial


def _check_recipe(kind: DecisionKind, stage: Stage, env: SpaceEnv, recipe: object, what: str) -> Recipe:
    if not isinstance(recipe, Recipe):
        raise _fail(kind, stage, f"{what} decodes to {type(recipe).__name__}, not a Recipe")
    units = env.adapter.all_units(env.param_names)
    try:
        recipe.validate_against(list(env.pool_names), env.adapter.num_layers, units)
    except Exception as exc:  # noqa: BLE001 - reported as the broken rule
        raise _fail(kind, stage, f"{what} decodes to an invalid Recipe: {exc}") from None
    if Recipe.from_json(recipe.to_json()) != recipe:
        raise _fail(kind, stage, f"{what}: the Recipe does not survive its JSON form")
    return recipe


def _fake_trials(
    space: StageSpace, names: list[str]
) -> tuple[dict[str, FrozenTrial], dict[str, dict[str, float]]]:
    """Finished trials for the enqueued points, with made-up metrics (a deterministic spread)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from olmopt.search.trials import LABEL_ATTR, RECIPE_ATTR

    trials: dict[str, FrozenTrial] = {}
    scores: dict[str, dict[str, float]] = {n: {} for n in names}
    for number, (label, params) in enumerate(space.enqueue):
        _, recipe, live = _decode(space, params)
        values = [0.5 + 0.4 * math.sin(1.7 * number + 0.9 * i) for i in range(len(names))]
        dists: dict[str, Any] = {}
        for key, value in live.params.items():
            if isinstance(value, str):
                dists[key] = CategoricalDistribution([value])
            elif isinstance(value, int) and not isinstance(value, bool):
                dists[key] = IntDistribution(value, value)
            else:
                dists[key] = FloatDistribution(float(value), float(value))
        trials[label] = optuna.trial.create_trial(
            params=dict(live.params),
            distributions=dists,
            values=values,
            user_attrs={
                **live.user_attrs,
                LABEL_ATTR: label,
                RECIPE_ATTR: recipe.to_json(),
                "feasible": True,
            },
        )
        trials[label].number = number
        for name, value in zip(names, values, strict=True):
            scores[name][label] = value
    return trials, scores


def check_kind(
    kind: DecisionKind | str,
    env: SpaceEnv,
    incumbent: Recipe | None = None,
    *,
    stages: int = 2,
    samples: int = 3,
) -> list[Stage]:
    """Check ``kind`` on (up to ``stages`` of) the stages it plans for ``env.config``; returns them.

    ``incumbent`` defaults to the config's base model alone.
    """
    kind = get_kind(kind) if isinstance(kind, str) else kind
    config = env.config
    incumbent = incumbent if incumbent is not None else Recipe(base=config.base_model)
    planned = kind.plan(config, env.adapter, list(env.param_names))
    if planned != kind.plan(config, env.adapter, list(env.param_names)):
        raise _fail(kind, None, "plan is not deterministic")
    if not planned:
        raise _fail(kind, None, "plans no stage for this config: the kit would check nothing")
    for stage in planned:
        if stage.kind not in kind.stage_kinds:
            raise _fail(kind, stage, f"plans a stage of kind {stage.kind!r}, not one of its stage_kinds")
    keys = [(s.kind, s.target, s.sweep) for s in planned]
    if len(set(keys)) != len(keys):
        raise _fail(kind, None, "plans the same stage twice")
    chosen = planned if len(planned) <= stages else [planned[0], *planned[1:][-(stages - 1) :]]
    from olmopt.search.context import directions_of  # the objectives' names, which decide rules read

    names = list(directions_of(config))
    for index, stage in enumerate(chosen):
        stage = Stage(index + 1, stage.kind, stage.target, stage.n_trials, stage.sweep)
        space = kind.build(stage, incumbent, env)
        again = kind.build(stage, incumbent, env)
        if space.enqueue != again.enqueue:
            raise _fail(kind, stage, "build enqueues different candidates on a second call")
        labels = [label for label, _ in space.enqueue]
        if len(set(labels)) != len(labels):
            raise _fail(kind, stage, f"enqueued labels are not unique: {labels}")
        # -- budget
        if kind.joint and (stage.n_trials <= 0 or space.budget != stage.n_trials):
            raise _fail(
                kind, stage, f"joint: budget {space.budget} is not the planned n_trials {stage.n_trials}"
            )
        if space.budget is not None and space.budget <= 0:
            raise _fail(kind, stage, f"budget {space.budget} must be positive (or None)")
        if space.extension is not None and (space.budget is None or space.extension.evaluations <= 0):
            raise _fail(kind, stage, "an extension needs a budget and a positive number of evaluations")
        if space.budget is None and not space.enqueue and space.decide is None:
            raise _fail(kind, stage, "nothing to evaluate and no acceptance rule: the stage cannot decide")
        # -- enqueued points
        for label, params in space.enqueue:
            _, recipe, trial = _decode(space, params)
            _check_recipe(kind, stage, env, recipe, f"enqueued {label!r}")
            extra = set(trial.params) - set(params)
            if extra:
                raise _fail(
                    kind, stage, f"enqueued {label!r} does not fix {sorted(extra)}, which decode reads"
                )
            _, recipe2, _ = _decode(space, params)
            if recipe2 != recipe:
                raise _fail(kind, stage, f"enqueued {label!r} decodes to another Recipe the second time")
        # -- sampled points (only where the runner asks the sampler for more)
        if space.budget is not None:
            for seed in range(samples):
                _, recipe, trial = _decode(space, None, seed)
                _check_recipe(kind, stage, env, recipe, f"sampled trial (seed {seed})")
                _, recipe2, _ = _decode(space, dict(trial.params))
                if recipe2 != recipe:
                    raise _fail(
                        kind, stage, f"sampled params {trial.params} decode to another Recipe when fixed"
                    )
        # -- decide and details: pure functions of the finished trials
        if space.enqueue and (space.decide is not None or space.details is not None):
            trials, scores = _fake_trials(space, names)
            feasible = dict.fromkeys(trials, True)
            if space.decide is not None:
                first = space.decide(trials, scores, feasible, labels[0])
                if first != space.decide(trials, scores, feasible, labels[0]):
                    raise _fail(kind, stage, "decide is not deterministic")
                if first is not None and first not in trials:
                    raise _fail(kind, stage, f"decide returned {first!r}, not a trial's label")
            if space.details is not None:
                found = space.details(trials)
                if json.dumps(found, sort_keys=True) != json.dumps(space.details(trials), sort_keys=True):
                    raise _fail(kind, stage, "details is not deterministic")
    return planned


def check_all(env: SpaceEnv, incumbent: Recipe | None = None, **kwargs: Any) -> dict[str, list[Stage]]:
    """``check_kind`` over every registered kind that plans a stage for ``env.config`` (some settings
    exclude each other: ``decisions.merge`` is ``joint`` or ``challenge``); returns the stages each one
    planned. A config that plans no stage of any kind is an error."""
    params = list(env.param_names)
    kinds = [k for k in registered() if k.plan(env.config, env.adapter, params)]
    if not kinds:
        raise AssertionError("no registered decision kind plans a stage for this config: nothing checked")
    return {", ".join(k.stage_kinds): check_kind(k, env, incumbent, **kwargs) for k in kinds}
