"""Small Optuna helpers: stage studies, the waiting-trial queue, recording results on a trial."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, Trial, TrialState

RECIPE_ATTR = "recipe"
LABEL_ATTR = "candidate"
METRIC_PREFIX = "m."
CONSTRAINT_PREFIX = "c."
REUSED_ATTR = "reused"  # metrics taken from an earlier decision or COMPLETE trial of the same model
REPEAT_ATTR = "repeat_of"  # a sampler's repeat of a stopped model that scored no item not known before


def costs_budget(trial: FrozenTrial) -> bool:
    """Whether a finished trial counts as an evaluation in a stage's budget: not when it reused metrics
    (``reused``) nor when it repeated a stopped model on items already scored (``repeat_of``)."""
    return REUSED_ATTR not in trial.user_attrs and REPEAT_ATTR not in trial.user_attrs


def pop_waiting(study: optuna.Study) -> Trial | None:
    """Take one enqueued (WAITING) trial, or None when the queue is empty. Safe across RDB workers."""
    storage = study._storage
    for frozen in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def has_waiting(study: optuna.Study) -> bool:
    """Whether an enqueued trial waits to be claimed."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


DONE_STATES = (
    TrialState.COMPLETE,
    TrialState.PRUNED,
)  # a candidate evaluated (PRUNED: stopped early, docs/early_stop.md)
PRUNED_ATTR = "pruned"  # why an early-stopped trial was stopped


def enqueued_labels(study: optuna.Study) -> set[str]:
    """Labels already present as waiting, running, complete or pruned trials (failed ones are retried)."""
    live = (TrialState.WAITING, TrialState.RUNNING, *DONE_STATES)
    return {str(t.user_attrs.get(LABEL_ATTR)) for t in study.get_trials(deepcopy=False, states=live)}


MAX_FAILURES = 3  # a candidate whose evaluation failed this often is given up (counted as done)


def enqueue_absent(
    study: optuna.Study,
    candidates: Sequence[tuple[str, dict[str, Any]]],
    attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Enqueue each ``(label, params)`` that has no waiting, running or complete trial and is not given up,
    with the user attrs ``attrs[label]`` if any. The one way a failed candidate is queued again; on shared
    storages its caller holds the stage's lock."""
    present = enqueued_labels(study) | exhausted_labels(study)
    for label, params in candidates:
        if label not in present:
            study.enqueue_trial(params, user_attrs={**(attrs or {}).get(label, {}), LABEL_ATTR: label})


def exhausted_labels(study: optuna.Study) -> set[str]:
    """Labels whose trials failed MAX_FAILURES times and never completed."""
    failed: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        label = str(t.user_attrs.get(LABEL_ATTR))
        failed[label] = failed.get(label, 0) + 1
    return {label for label, n in failed.items() if n >= MAX_FAILURES}


def record_result(
    trial: Trial,
    metrics: Mapping[str, float],
    constraints: Mapping[str, float],
    feasible: bool,
    recipe_json: str,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Flat numeric user attrs (dashboard-friendly), constraints, the trial's Recipe and ``extra`` attrs
    (per-item values, ``n_items``).

    On RDB storages everything is written in one transaction (one round trip instead of one per
    attribute); constraints are Optuna's ``constraints:<name>`` system attrs, as ``set_constraint``
    writes them.
    """
    attrs: dict[str, Any] = {RECIPE_ATTR: recipe_json}
    attrs.update({METRIC_PREFIX + name: _finite_or_none(value) for name, value in metrics.items()})
    attrs.update({CONSTRAINT_PREFIX + name: float(value) for name, value in constraints.items()})
    attrs["feasible"] = int(bool(feasible))  # a number: sortable and plottable in the dashboard
    attrs.update(extra or {})
    if any(math.isnan(float(v)) for v in constraints.values()):
        raise ValueError("a constraint value is NaN")
    backend = _rdb_backend(trial.study._storage)
    if backend is None:
        for name, value in constraints.items():
            trial.set_constraint(name, value)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    system = {f"{_CONSTRAINTS_KEY}:{name}": float(value) for name, value in constraints.items()}
    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in attrs.items():
            backend._set_trial_attr_without_commit(
                session, models.TrialUserAttributeModel, trial._trial_id, key, value
            )
        for key, value in system.items():
            backend._set_trial_attr_without_commit(
                session, models.TrialSystemAttributeModel, trial._trial_id, key, value
            )
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what Trial.set_user_attr keeps in step


_CONSTRAINTS_KEY = "constraints"  # Optuna 5's system-attr prefix of set_constraint values


def _rdb_backend(storage: Any) -> RDBStorage | None:
    """The RDBStorage behind Optuna's cache wrapper, or None (journal, in-memory)."""
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


INFEASIBLE_ATTR = "infeasible"  # why a trial is infeasible beyond its constraints (non-finite outputs)


def nonfinite_objectives(metrics: Mapping[str, float], names: list[str]) -> list[str]:
    """Objectives whose value is NaN, inf or missing: the model's outputs were not finite."""
    return [n for n in names if not math.isfinite(float(metrics.get(n, math.nan)))]


def told_values(metrics: Mapping[str, float], names: list[str], directions: Mapping[str, str]) -> list[float]:
    """Objective values for ``study.tell``: NaN (which Optuna would turn into a failed trial, retried)
    becomes the worst value of its direction, so the trial completes and ranks last."""
    out = []
    for n in names:
        v = float(metrics.get(n, math.nan))
        out.append(v if not math.isnan(v) else (math.inf if directions[n] == "minimize" else -math.inf))
    return out


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def metrics_of(trial: FrozenTrial, names: list[str]) -> dict[str, float]:
    """Objective values of a finished trial keyed by objective name."""
    values = trial.values or []
    return {n: float(v) for n, v in zip(names, values, strict=False)}


def fail_running(study: optuna.Study) -> int:
    """Mark every RUNNING trial FAIL (only when this process is the storage's sole writer)."""
    storage = study._storage
    n = 0
    for frozen in storage.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            storage.set_trial_state_values(frozen._trial_id, state=TrialState.FAIL)
            n += 1
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return n
