"""Small Optuna helpers: stage studies, the waiting-trial queue, recording results on a trial."""

from __future__ import annotations

import math
from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

RECIPE_ATTR = "recipe"
LABEL_ATTR = "candidate"
METRIC_PREFIX = "m."
CONSTRAINT_PREFIX = "c."


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


def enqueued_labels(study: optuna.Study) -> set[str]:
    """Labels already present as waiting, running or complete trials (failed ones are retried)."""
    live = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE)
    return {str(t.user_attrs.get(LABEL_ATTR)) for t in study.get_trials(deepcopy=False, states=live)}


MAX_FAILURES = 3  # a candidate whose evaluation failed this often is given up (counted as done)


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
) -> None:
    """Flat numeric user attrs (dashboard-friendly), constraints, and the trial's Recipe."""
    trial.set_user_attr(RECIPE_ATTR, recipe_json)
    for name, value in metrics.items():
        trial.set_user_attr(METRIC_PREFIX + name, _finite_or_none(value))
    for name, value in constraints.items():
        trial.set_constraint(name, value)
        trial.set_user_attr(CONSTRAINT_PREFIX + name, value)
    trial.set_user_attr("feasible", int(bool(feasible)))  # a number: sortable and plottable in the dashboard


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
