"""Run a campaign's stages in order: enqueue candidates, evaluate trials, select, record the decision.

Greedy stage: every candidate is enqueued once (idempotently), popped and evaluated (K at a time),
then the stage selects among its COMPLETE trials: feasible Pareto set, Copeland over per-objective
ranks, Borda and a fixed order breaking ties; with nothing feasible the incumbent stays. Joint stage:
the sampler proposes full assignments of its slots within a trial budget (the incumbent is enqueued
first), then the same selection. Interrupted work resumes: decided stages are skipped, finished trials
are kept, trials left RUNNING by a dead single-writer process are failed and their candidates re-queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import Trial, TrialState
from tqdm import tqdm

from olmopt.recipe import Recipe
from olmopt.search import trials as T
from olmopt.search.campaign import DECISION_ATTR, Campaign
from olmopt.search.context import objectives_of
from olmopt.search.plan import (
    Stage,
    apply_choice,
    current_donor,
    greedy_candidates,
    joint_slots,
    prefix_layer,
)
from olmopt.search.storage import is_sqlite
from olmopt.search.workers import Evaluators
from olmopt.select import degradation_constraints, is_feasible, select


@dataclass
class RunOutcome:
    finished: bool
    stages_run: int
    trials_run: int
    final: Recipe | None


def make_sampler(campaign: Campaign, stage: Stage, worker_seed: int = 0) -> optuna.samplers.BaseSampler:
    cfg = campaign.config.sampler
    seed = cfg.seed + 1000 * stage.index + worker_seed
    if not stage.is_joint:
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=cfg.multivariate, n_startup_trials=10)


class CampaignRunner:
    """Drives one campaign to completion (or until a timeout / trial cap)."""

    def __init__(
        self,
        campaign: Campaign,
        evaluators: Evaluators,
        progress: bool = True,
        n_trials: int | None = None,
        timeout: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.c = campaign
        self.ev = evaluators
        self.progress = progress
        self.n_trials = n_trials
        self.deadline = time.monotonic() + timeout if timeout else None
        self.log = log or (lambda _msg: None)
        self.names = campaign.objective_names()
        self.directions = campaign.directions()
        self.metric_of = {o.name: o.metric for o in objectives_of(campaign.config)}
        self.pool_names = list(campaign.config.pool.models)
        self.trials_run = 0

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self) -> RunOutcome:
        stages_run = 0
        decisions = self.c.decisions()
        for stage in self.c.plan:
            if stage.key in decisions:
                continue
            if self._out_of_time():
                break
            decision = self.run_stage(stage, decisions)
            if decision is None:
                break
            decisions[stage.key] = decision
            stages_run += 1
        finished = all(s.key in decisions for s in self.c.plan)
        return RunOutcome(finished, stages_run, self.trials_run, self.c.final_recipe())

    # -- one stage -------------------------------------------------------------------------------------
    def run_stage(self, stage: Stage, decisions: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        incumbent = self.c.incumbent_before(stage, decisions)
        study = self.c.stage_study(stage, make_sampler(self.c, stage))
        if is_sqlite(self.c.url):
            T.fail_running(study)  # we hold the single-writer lock: RUNNING trials are orphans
        references = self._references(decisions, incumbent)
        layer = prefix_layer(stage, self._adapter())
        if stage.is_joint:
            decode = self._joint_decoder(stage, incumbent)
            budget = self.n_trials or stage.n_trials
            self._enqueue_incumbent(study, stage, incumbent)
            done = self._evaluate(study, stage, decode, incumbent, None, references, budget)
        else:
            candidates = greedy_candidates(stage, incumbent, self.pool_names)
            missing = [label for label in candidates if label not in T.enqueued_labels(study)]
            for label in missing:
                study.enqueue_trial({"donor": label}, user_attrs={T.LABEL_ATTR: label})

            def decode(trial: Trial) -> tuple[str, Recipe]:
                label = trial.suggest_categorical("donor", list(candidates))
                return str(label), candidates[str(label)]

            done = self._evaluate(study, stage, decode, incumbent, layer, references, None)
        if not done:
            return None
        return self._decide(study, stage, incumbent)

    def _adapter(self):  # type: ignore[no-untyped-def]
        return self.ev.local.pool.adapter

    def _references(self, decisions: dict[str, dict[str, Any]], incumbent: Recipe | None) -> dict[str, dict[str, float]]:
        refs: dict[str, dict[str, float]] = {}
        base_key = self.c.plan[0].key
        if base_key in decisions:
            refs["base"] = decisions[base_key]["metrics"]
        if incumbent is not None:
            for stage in reversed(self.c.plan):
                d = decisions.get(stage.key)
                if d and d["recipe"] == incumbent.to_json():
                    refs["incumbent"] = d["metrics"]
                    break
        return refs

    def _joint_decoder(self, stage: Stage, incumbent: Recipe | None) -> Callable[[Trial], tuple[str, Recipe]]:
        assert incumbent is not None
        slots = joint_slots(stage, self.c.config, self._adapter(), self.ev.local.working.param_names)

        def decode(trial: Trial) -> tuple[str, Recipe]:
            recipe = incumbent
            for slot in slots:
                recipe = apply_choice(recipe, slot, str(trial.suggest_categorical(slot, self.pool_names)))
            return f"#{trial.number}", recipe

        return decode

    def _enqueue_incumbent(self, study: optuna.Study, stage: Stage, incumbent: Recipe | None) -> None:
        if incumbent is None or study.get_trials(deepcopy=False):
            return
        slots = joint_slots(stage, self.c.config, self._adapter(), self.ev.local.working.param_names)
        params = {slot: current_donor(incumbent, slot, self._adapter()) for slot in slots}
        study.enqueue_trial(params, user_attrs={T.LABEL_ATTR: "incumbent"})

    def _evaluate(
        self,
        study: optuna.Study,
        stage: Stage,
        decode: Callable[[Trial], tuple[str, Recipe]],
        incumbent: Recipe | None,
        layer: int | None,
        references: dict[str, dict[str, float]],
        budget: int | None,
    ) -> bool:
        """Evaluate queued (greedy) or sampled (joint) trials. False when stopped early."""
        complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        total = budget if budget is not None else complete + len(
            study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        )
        bar = tqdm(total=total, initial=complete, desc=f"stage {stage.key}", disable=not self.progress, leave=False)
        in_flight: dict[Future[dict[str, float]], tuple[Trial, str, Recipe]] = {}
        stopped = False
        try:
            while True:
                while len(in_flight) < self.ev.workers and not stopped:
                    if self._out_of_time():
                        stopped = True
                        break
                    trial = T.pop_waiting(study)
                    if trial is None and budget is not None and complete + len(in_flight) < budget:
                        trial = study.ask()
                    if trial is None:
                        break
                    label, recipe = decode(trial)
                    trial.set_user_attr(T.LABEL_ATTR, label)
                    in_flight[self.ev.submit(recipe, incumbent, layer)] = (trial, label, recipe)
                if not in_flight:
                    break
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    trial, label, recipe = in_flight.pop(future)
                    metrics = future.result()
                    self._tell(study, trial, recipe, metrics, references)
                    complete += 1
                    self.trials_run += 1
                    bar.update(1)
        except BaseException:
            for trial, _label, _recipe in in_flight.values():
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            bar.close()
        return not stopped

    def _tell(self, study: optuna.Study, trial: Trial, recipe: Recipe, metrics: dict[str, float], references: dict[str, dict[str, float]]) -> None:
        constraints = (
            degradation_constraints(metrics, references, self.directions, self.c.config.selection.improve_all, self.metric_of)
            if "base" in references
            else {}
        )
        feasible = is_feasible(constraints)
        T.record_result(trial, metrics, constraints, feasible, recipe.to_json())
        study.tell(trial, [metrics[n] for n in self.names], skip_if_finished=True)

    def _decide(self, study: optuna.Study, stage: Stage, incumbent: Recipe | None) -> dict[str, Any]:
        existing = study.user_attrs.get(DECISION_ATTR)
        if existing:
            return existing
        trials: dict[str, Any] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            label = str(t.user_attrs.get(T.LABEL_ATTR, f"#{t.number}"))
            trials.setdefault(label, t)  # a retried candidate: the first completed result counts
        scores = {n: {label: float(t.values[i]) for label, t in trials.items()} for i, n in enumerate(self.names)}
        feasible = {label: bool(t.user_attrs.get("feasible", True)) for label, t in trials.items()}
        keep = None
        if incumbent is not None:
            keep = next((lbl for lbl, t in trials.items() if t.user_attrs.get(T.RECIPE_ATTR) == incumbent.to_json()), None)
        order = {name: i for i, name in enumerate(self.pool_names)}
        selection = select(
            scores, self.directions, feasible, keep=keep,
            tie_key=lambda c: (c != keep, order.get(c, len(order)), c),
        )  # fmt: skip
        if selection.winner is None:  # nothing feasible and the incumbent was not evaluated here
            assert incumbent is not None
            recipe, metrics, trial_number, winner = incumbent, {}, None, "incumbent"
        else:
            winner = selection.winner
            t = trials[winner]
            recipe = Recipe.from_json(t.user_attrs[T.RECIPE_ATTR])
            metrics, trial_number = T.metrics_of(t, self.names), t.number
        if not metrics:
            metrics = self.ev.local.score(recipe, "search")
        held_out = {}
        if self.c.config.selection.held_out_check and any(o.held_out > 0 for o in self.c.config.objectives):
            held_out = self.ev.local.score(recipe, "held_out")
        decision = {
            "stage": stage.key,
            "winner": winner,
            "trial": trial_number,
            "kept_incumbent": keep is not None and winner == keep,
            "recipe": recipe.to_json(),
            "metrics": metrics,
            "held_out": held_out,
            "reason": selection.reason,
            "candidates": {
                label: {"metrics": T.metrics_of(t, self.names), "feasible": feasible[label], "trial": t.number}
                for label, t in trials.items()
            },
        }
        study.set_user_attr(DECISION_ATTR, decision)
        if trial_number is not None:
            study.set_user_attr("olmopt.winner_trial", trial_number)
        self.log(f"{stage.key}: {winner} ({selection.reason})")
        return decision
