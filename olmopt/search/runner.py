"""Run a campaign's stages in order: enqueue candidates, evaluate trials, select, record the decision.

Each stage's search space comes from its registered decision kind (``olmopt.search.kinds``: greedy
swaps enqueue every candidate, joint stages sample within a budget). Selection: feasible Pareto set, then Copeland over
per-objective ranks, Borda and a fixed order breaking ties; with nothing feasible the incumbent stays.

Resumable and shareable: decided stages are skipped, finished trials are kept, candidates are enqueued
once under a storage-wide lock, trials left RUNNING by a dead worker are failed (SQLite: at start, since
this process is the only writer; RDB: by heartbeat) and retried, and every worker waits for the stage's
last trial before the (deterministic, hence idempotent) decision is recorded.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm import tqdm

from olmopt.errors import OlmoptError
from olmopt.recipe import Recipe
from olmopt.search import trials as T
from olmopt.search.annotate import annotate_decision, annotate_trial
from olmopt.search.campaign import DECISION_ATTR, Campaign
from olmopt.search.context import objectives_of
from olmopt.search.coordination import StageLock, fail_dead_workers_trials, heartbeat_enabled
from olmopt.search.kind import Stage, StageSpace
from olmopt.search.kinds import get_kind
from olmopt.search.seeding import TrialSeeded
from olmopt.search.storage import is_sqlite, stale_after
from olmopt.search.workers import Evaluators
from olmopt.select import degradation_constraints, is_feasible, objective_mean, select

LIVE_STATES = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)  # trials that spend the budget
POLL_SECONDS = (0.05, 1.0)  # waiting for other workers: first poll, then x1.5 up to the second
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def _next_poll(poll: float) -> float:
    return min(POLL_SECONDS[1], poll * 1.5)


@dataclass
class RunOutcome:
    finished: bool
    stages_run: int
    trials_run: int
    final: Recipe | None


REUSE_CAP = 3  # a budget of N evaluations stops after 3 N trials however many repeat earlier ones


def _budget_spent(trials: list[FrozenTrial], budget: int) -> bool:
    """Whether ``trials`` (complete or running) use up a budget of ``budget`` evaluations."""
    evaluated = sum("reused" not in t.user_attrs for t in trials)
    return evaluated >= budget or len(trials) >= REUSE_CAP * budget


def make_sampler(campaign: Campaign, stage: Stage, worker_seed: int = 0, env: Any = None) -> optuna.samplers.BaseSampler:
    """The kind's own sampler if it has one; else greedy stages only pop enqueued trials and joint stages
    use the configured sampler (per-worker seed)."""
    cfg = campaign.config.sampler
    seed = cfg.seed + 1000 * stage.index + worker_seed
    kind = get_kind(stage.kind)
    own = kind.sampler(stage, campaign.config, seed, env)
    if own is not None:
        return own
    if not kind.joint:
        return optuna.samplers.RandomSampler(seed=seed)
    name = kind.sampler_name(campaign.config) or cfg.name
    if name == "catcma":
        space = kind.distributions(stage, env)
        if space is not None:  # a kind that cannot declare its space up front gets TPE
            from olmopt.search.catcma_sampler import CatCmaSampler

            return CatCmaSampler(space, seed=seed, population_size=cfg.population_size)
    inner: optuna.samplers.BaseSampler
    if name == "nsga2":
        inner = optuna.samplers.NSGAIISampler(seed=seed, population_size=cfg.nsga2_population(stage.n_trials))
    elif name == "gp":
        inner = optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    elif name == "random":
        inner = optuna.samplers.RandomSampler(seed=seed)
    else:  # group=True keeps conditional parameters (per-method knobs, per-slot scales) in joint models
        inner = optuna.samplers.TPESampler(
            seed=seed, multivariate=cfg.multivariate, group=cfg.multivariate, n_startup_trials=cfg.n_startup_trials
        )
    return TrialSeeded(inner, seed)  # a resumed stage suggests what an uninterrupted one would


@dataclass
class _Env:
    config: Any
    pool_names: list[str]
    adapter: Any
    param_names: list[str]
    context: Any  # the in-process EvalContext (resident model, tokenizer), for spaces that need it
    pool: Any  # the ModelPool of that context
    decisions: dict[str, dict[str, Any]] = field(default_factory=dict)


class CampaignRunner:
    """Drives one campaign to completion (or until a timeout)."""

    def __init__(
        self,
        campaign: Campaign,
        evaluators: Evaluators,
        progress: bool = True,
        n_trials: int | None = None,
        timeout: float | None = None,
        log: Callable[[str], None] | None = None,
        worker_seed: int = 0,
    ) -> None:
        self.c = campaign
        self.ev = evaluators
        self.progress = progress
        self.n_trials = n_trials
        self.deadline = time.monotonic() + timeout if timeout else None
        self.log = log or (lambda _msg: None)
        self.worker_seed = worker_seed
        self.names = campaign.objective_names()
        self.directions = campaign.directions()
        self.metric_of = {o.name: o.metric for o in objectives_of(campaign.config)}
        self.pool_names = list(campaign.config.pool.models)
        self.trials_run = 0
        self._env: _Env | None = None
        self._overall: tqdm | None = None  # the campaign bar, in trials
        self._keys: dict[str, str] = {}  # Recipe JSON -> model_key

    @property
    def env(self) -> _Env:
        if self._env is None:
            working = self.ev.local.working
            self._env = _Env(self.c.config, self.pool_names, working.adapter, working.param_names, self.ev.local, self.ev.local.pool)
        return self._env

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self) -> RunOutcome:
        stages_run = 0
        decisions = self.c.decisions()
        self.env.decisions = decisions  # spaces read earlier decisions (the ES sigma search)
        pending = [s for s in self.c.plan if s.key not in decisions]
        # the campaign bar counts trials (its ETA follows them); a stage's estimate is corrected when it starts
        expected = sum(self._expected_trials(s) for s in pending)
        overall = tqdm(total=expected, desc=f"campaign {self.c.name}", unit="trial", disable=not self.progress)
        self._overall = overall
        self.log(f"campaign {self.c.name}: {len(pending)} of {len(self.c.plan)} stages to run (about {expected} trials)")
        try:
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
        finally:
            overall.close()  # also on Ctrl-C: the bar ends its line, so the message that follows has its own
        finished = all(s.key in decisions for s in self.c.plan)
        return RunOutcome(finished, stages_run, self.trials_run, self.c.final_recipe())

    def _expected_trials(self, stage: Stage) -> int:
        """Trials a stage will probably take before its space is built: its budget, else one per pool model."""
        if stage.n_trials:
            return self.n_trials or stage.n_trials
        return len(self.pool_names)

    # -- one stage -------------------------------------------------------------------------------------
    def run_stage(self, stage: Stage, decisions: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        incumbent = self.c.incumbent_before(stage, decisions)
        study = self.c.stage_study(stage, make_sampler(self.c, stage, self.worker_seed, self.env))
        existing = study.user_attrs.get(DECISION_ATTR)
        if existing:
            return existing
        space = get_kind(stage.kind).build(stage, incumbent, self.env)
        if self.n_trials and space.budget is not None:
            space.budget = self.n_trials
        if is_sqlite(self.c.url):
            T.fail_running(study)  # we hold the single-writer lock: RUNNING trials are orphans
        self._enqueue_missing(study, stage, space)
        references = self._references(decisions, incumbent)
        if not self._evaluate(study, stage, space, incumbent, references):
            return None
        return self._decide(study, stage, incumbent, space)

    def _enqueue_missing(self, study: optuna.Study, stage: Stage, space: StageSpace) -> None:
        """Enqueue every candidate that has no waiting, running or complete trial (idempotent, locked).

        When another worker holds the stage's lock it is enqueueing them: this one goes on and takes
        trials as they appear (the evaluation loop calls this again while it waits).
        """
        if not space.enqueue:
            return
        if is_sqlite(self.c.url):  # this process is the only writer: no lock
            T.enqueue_absent(study, space.enqueue)
            return
        present = T.enqueued_labels(study) | T.exhausted_labels(study)
        if all(label in present for label, _ in space.enqueue):
            return  # the common case while waiting: nothing to enqueue, no lock taken
        lock = StageLock(self.c.storage, self.c.stage_study_name(stage))
        if not lock.acquire():
            return
        try:
            T.enqueue_absent(study, space.enqueue)
        finally:
            lock.release()

    def _sweep_stale(self, study: optuna.Study) -> None:
        """Fail trials of dead workers (so that their candidates are retried)."""
        if not is_sqlite(self.c.url):  # SQLite has a single writer: its orphans were failed at stage start
            fail_dead_workers_trials(study, self.c.storage, stale_after())

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

    def _stage_complete(self, study: optuna.Study, space: StageSpace) -> tuple[bool, int]:
        """(every enqueued label and the budget are done, number of COMPLETE trials).

        A budget counts evaluations: trials whose metrics were reused (a repeated suggestion, the
        incumbent again) are free, up to ``REUSE_CAP`` times the budget in trials."""
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        done_labels = {str(t.user_attrs.get(T.LABEL_ATTR)) for t in complete} | T.exhausted_labels(study)
        labels_done = all(label in done_labels for label, _ in space.enqueue)
        budget_done = space.budget is None or _budget_spent(complete, space.budget)
        return labels_done and budget_done, len(complete)

    def _next_trial(self, study: optuna.Study, space: StageSpace, writer: _Writer) -> Trial | None:
        trial = T.pop_waiting(study)
        if trial is None and space.budget is not None:
            writer.flush()  # the sampler sees every finished trial: the same suggestions as a sequential run
            live = study.get_trials(deepcopy=False, states=LIVE_STATES)  # a queued retry counts too
            if not _budget_spent(live, space.budget):
                trial = study.ask()
        return trial

    def _same_model_in_stage(self, study: optuna.Study, recipe: Recipe) -> FrozenTrial | None:
        """A COMPLETE trial of this stage with the same weights (a sampler repeating itself)."""
        key = self._model_key(recipe.to_json())
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            recipe_json = t.user_attrs.get(T.RECIPE_ATTR)
            if recipe_json and self._model_key(str(recipe_json)) == key:
                return t
        return None

    def _evaluate(
        self, study: optuna.Study, stage: Stage, space: StageSpace, incumbent: Recipe | None, references: dict[str, dict[str, float]]
    ) -> bool:
        """Evaluate until the stage is complete. False when stopped early (timeout)."""
        total = space.budget if space.budget is not None else len(space.enqueue)
        _, complete = self._stage_complete(study, space)
        bar = tqdm(total=total, initial=min(complete, total), desc=f"stage {stage.key}", unit="trial", disable=not self.progress, leave=False)
        overall = self._overall
        remaining = max(total - complete, 0)
        if overall is not None:  # the stage's estimate becomes what it really has left
            overall.total += remaining - self._expected_trials(stage)
            overall.refresh()
        in_flight: dict[Future[dict[str, float]], tuple[Trial, Recipe]] = {}
        beat = _Heartbeat(study, in_flight) if heartbeat_enabled(self.c.storage) else None
        writer = _Writer()
        poll = POLL_SECONDS[0]
        try:
            while True:
                while len(in_flight) < self.ev.workers and not self._out_of_time():
                    trial = self._next_trial(study, space, writer)
                    if trial is None:
                        break
                    poll = POLL_SECONDS[0]
                    try:
                        label, recipe = space.decode(trial)
                        if beat is not None:
                            beat.record(trial)  # at once: a worker killed after this goes stale in one grace period
                        if trial.user_attrs.get(T.LABEL_ATTR) is None:  # enqueued trials keep their label
                            trial.set_user_attr(T.LABEL_ATTR, label)
                        trial.set_user_attr("worker", WORKER_ID)
                        if space.run is not None:
                            self._run_inline(space, trial, recipe, in_flight)
                            continue
                        earlier = self._earlier_decision(recipe)
                        same = self._same_model_in_stage(study, recipe) if earlier is None and space.budget else None
                        if earlier is not None or same is not None:  # the incumbent again, a repeat: already scored
                            if earlier is not None:
                                trial.set_user_attr("reused", earlier["stage"])
                                reused = dict(earlier["metrics"])
                            else:
                                assert same is not None
                                trial.set_user_attr("reused", f"trial {same.number}")
                                reused = T.metrics_of(same, self.names)
                            future: Future[dict[str, float]] = Future()
                            future.set_result(reused)
                            in_flight[future] = (trial, recipe)
                            continue
                        future = self.ev.submit(recipe, incumbent, space.layer)  # inline when workers == 1
                    except BaseException:
                        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                        raise
                    in_flight[future] = (trial, recipe)
                if not in_flight:
                    writer.flush()
                    done, _ = self._stage_complete(study, space)
                    if done:
                        return True
                    if self._out_of_time():
                        return False
                    self._sweep_stale(study)  # other workers' dead trials get failed ...
                    self._enqueue_missing(study, stage, space)  # ... and their candidates retried
                    time.sleep(poll)  # soon at first: the stage's last trials are about to finish
                    poll = _next_poll(poll)
                    continue
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    trial, recipe = in_flight[future]  # stays listed until told, so an interrupt fails it
                    try:
                        metrics = future.result()
                    except OlmoptError:
                        raise  # the user's input is wrong: every trial would fail the same way
                    except Exception as exc:  # noqa: BLE001 - a numerical failure rejects this candidate only
                        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:300])
                        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                        self.log(f"{stage.key}: trial {trial.number} failed ({type(exc).__name__}: {exc})")
                        del in_flight[future]
                        continue
                    writer.submit(self._tell, study, trial, recipe, metrics, references)  # the next evaluation starts now
                    del in_flight[future]
                    self.trials_run += 1
                    bar.update(1)
                    if overall is not None:
                        overall.update(1)
                        remaining -= 1
        except BaseException:  # finished evaluations are still recorded (``finally``); the ones in flight fail
            for trial, _recipe in list(in_flight.values()):
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            writer.close()
            if beat is not None:
                beat.stop()
            bar.close()
            if overall is not None and remaining > 0:  # others' trials, or fewer than budgeted: not ahead any more
                overall.total -= remaining
                overall.refresh()

    @staticmethod
    def _run_inline(
        space: StageSpace, trial: Trial, recipe: Recipe, in_flight: dict[Future[dict[str, float]], tuple[Trial, Recipe]]
    ) -> None:
        """A multi-evaluation trial, in this process; listed in flight meanwhile (heartbeats, interrupts)."""
        assert space.run is not None
        future: Future[dict[str, float]] = Future()
        in_flight[future] = (trial, recipe)
        try:
            final, metrics = space.run(trial, recipe)
        except OlmoptError:
            del in_flight[future]
            raise
        except Exception as exc:  # noqa: BLE001 - reported through the future, like a worker's failure
            future.set_exception(exc)
            return
        in_flight[future] = (trial, final)
        future.set_result(metrics)

    def _tell(self, study: optuna.Study, trial: Trial, recipe: Recipe, metrics: dict[str, float], references: dict[str, dict[str, float]]) -> None:
        rule = self.c.config.selection.improve_all
        constraints = degradation_constraints(metrics, references, self.directions, rule, self.metric_of) if "base" in references else {}
        nonfinite = T.nonfinite_objectives(metrics, self.names)  # a damaged model: infeasible, and why
        try:
            T.record_result(trial, metrics, constraints, is_feasible(constraints) and not nonfinite, recipe.to_json())
            if nonfinite:
                trial.set_user_attr(T.INFEASIBLE_ATTR, f"non-finite outputs (NaN/inf logits) on {', '.join(nonfinite)}")
        except optuna.exceptions.UpdateFinishedTrialError:  # its beats were late: another worker failed it
            self.log(f"trial {trial.number}: failed meanwhile by another worker's heartbeat sweep; evaluated again")
            return
        annotate_trial(self.c, trial, recipe.to_json())  # before tell: a finished trial takes no artifacts
        study.tell(trial, T.told_values(metrics, self.names, self.directions), skip_if_finished=True)

    def _decide(self, study: optuna.Study, stage: Stage, incumbent: Recipe | None, space: StageSpace) -> dict[str, Any]:
        """The stage's decision: recorded by exactly one worker (the holder of the stage's decide lock);
        the others wait for it. A decider that dies leaves a stale lock, which the next worker breaks."""
        if is_sqlite(self.c.url):  # this process is the only writer
            return study.user_attrs.get(DECISION_ATTR) or self._record_decision(study, stage, incumbent, space)
        lock = StageLock(self.c.storage, f"{self.c.stage_study_name(stage)}#decide")
        poll = POLL_SECONDS[0]
        while True:
            existing = study.user_attrs.get(DECISION_ATTR)
            if existing:
                return existing
            if lock.acquire():
                break
            time.sleep(poll)
            poll = _next_poll(poll)
        try:
            existing = study.user_attrs.get(DECISION_ATTR)  # recorded between the check and the lock
            return existing if existing else self._record_decision(study, stage, incumbent, space)
        finally:
            lock.release()

    def _record_decision(self, study: optuna.Study, stage: Stage, incumbent: Recipe | None, space: StageSpace) -> dict[str, Any]:
        trials: dict[str, FrozenTrial] = {}
        for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
            trials.setdefault(str(t.user_attrs.get(T.LABEL_ATTR, f"#{t.number}")), t)  # a retry: first result counts
        scores = {n: {label: float(t.values[i]) for label, t in trials.items()} for i, n in enumerate(self.names)}
        feasible = {label: bool(t.user_attrs.get("feasible", True)) for label, t in trials.items()}
        keep = None
        guarded: dict[str, dict[str, float]] = {}  # held-out figures of the guard's candidates
        if incumbent is not None:
            same = [lbl for lbl, t in trials.items() if t.user_attrs.get(T.RECIPE_ATTR) == incumbent.to_json()]
            named = [lbl for lbl, _ in space.enqueue if lbl in same]  # the enqueued parent/incumbent first
            keep = named[0] if named else (same[0] if same else None)
        if space.decide is not None:
            winner, reason = space.decide(trials, scores, feasible, keep), "stage acceptance rule"
        else:
            order = {name: i for i, name in enumerate(self.pool_names)}
            selection = select(
                scores, self.directions, feasible, keep=keep,
                tie_key=lambda c: (c != keep, order.get(c, len(order)), c),
                tolerance=self.c.config.selection.tolerance, score=self.c.config.selection.score,
            )  # fmt: skip
            winner, reason = selection.winner, selection.reason
            guard = self.c.config.selection.held_out_guard
            if get_kind(stage.kind).joint and guard > 1 and winner is not None and self._has_held_out():
                winner, reason, guarded = self._held_out_guard(trials, selection.order[:guard], reason)
        earlier = self._earlier_decision(incumbent)
        if winner is None:  # nothing acceptable and the incumbent was not evaluated here
            assert incumbent is not None
            recipe, trial_number, label = incumbent, None, "incumbent"
            metrics = earlier["metrics"] if earlier else self.ev.local.score(recipe, "search")
        else:
            t = trials[winner]
            recipe, trial_number, label = Recipe.from_json(t.user_attrs[T.RECIPE_ATTR]), t.number, winner
            metrics = T.metrics_of(t, self.names)
        held_out: dict[str, float] = {}
        if winner is not None and winner in guarded:
            held_out = guarded[winner]
        elif self.c.config.selection.held_out_check and self._has_held_out():
            same_model = earlier is not None and self._model_key(earlier["recipe"]) == self._model_key(recipe.to_json())
            if earlier is not None and same_model and earlier.get("held_out"):
                held_out = dict(earlier["held_out"])
            else:
                held_out = self.ev.local.score(recipe, "held_out")
        decision: dict[str, Any] = {
            "stage": stage.key,
            "winner": label,
            "trial": trial_number,
            "kept_incumbent": keep is not None and label == keep,
            "recipe": recipe.to_json(),
            "metrics": metrics,
            "held_out": held_out,
            "reason": reason,
            "decided_by": WORKER_ID,
            "candidates": {
                lbl: {"metrics": T.metrics_of(t, self.names), "feasible": feasible[lbl], "trial": t.number}
                for lbl, t in trials.items()
            },
        }
        for lbl, figures in guarded.items():
            decision["candidates"][lbl]["held_out"] = figures
        if guarded:
            decision["held_out_guard"] = list(guarded)  # the candidates it compared, search order
        if held_out and get_kind(stage.kind).joint:  # named starting points (baselines) get held-out figures too
            for lbl, _params in space.enqueue:
                if lbl in trials and lbl != label and lbl not in guarded:
                    baseline = Recipe.from_json(trials[lbl].user_attrs[T.RECIPE_ATTR])
                    decision["candidates"][lbl]["held_out"] = self.ev.local.score(baseline, "held_out")
        if space.details is not None:
            decision.update(space.details(trials))
        study.set_user_attr(DECISION_ATTR, decision)
        annotate_decision(self.c, study, decision)
        why = reason.removeprefix(f"{label!r}: ")
        self.log(f"{stage.key}: winner {label} ({why}); {len(trials)} trials; {self._figures(metrics, held_out)}")
        return decision


    def _has_held_out(self) -> bool:
        return any(o.held_out > 0 for o in self.c.config.objectives)

    def _held_out_guard(
        self, trials: dict[str, FrozenTrial], top: list[str], reason: str
    ) -> tuple[str, str, dict[str, dict[str, float]]]:
        """The overfitting guard of a joint stage: among the ``top`` candidates of the search-split
        selection, the one with the best held-out mean (maximised objectives; others count negated),
        ties to the search order. Returns (winner, reason, held-out figures of every guarded candidate)."""
        figures = {lbl: self.ev.local.score(Recipe.from_json(trials[lbl].user_attrs[T.RECIPE_ATTR]), "held_out") for lbl in top}
        by_objective = {n: {lbl: figures[lbl][n] for lbl in top} for n in self.names}
        best = max(top, key=lambda lbl: (objective_mean(by_objective, self.directions, lbl), -top.index(lbl)))
        if best != top[0]:
            reason = f"{reason}; held-out guard: {best!r} has the best held-out mean of the top {len(top)}"
        return best, reason, figures

    def _figures(self, metrics: dict[str, float], held_out: dict[str, float]) -> str:
        """``acc 0.9333 ppl 1.204`` (held-out figures in brackets) for log lines."""
        def cell(n: str) -> str:
            held = f" [{held_out[n]:.4g}]" if n in held_out else ""
            return f"{n} {metrics[n]:.4g}{held}" if n in metrics else f"{n} -"

        return " ".join(cell(n) for n in self.names)

    def _model_key(self, recipe_json: str) -> str:
        from olmopt.patch import model_key  # torch: only where trials are run

        if recipe_json not in self._keys:
            recipe = Recipe.from_json(recipe_json)
            self._keys[recipe_json] = model_key(recipe, self.env.adapter, self.env.param_names)
        return self._keys[recipe_json]

    def _earlier_decision(self, recipe: Recipe | None) -> dict[str, Any] | None:
        """The latest decision whose Recipe describes the same weights (its metrics need no new evaluation)."""
        if recipe is None:
            return None
        key = self._model_key(recipe.to_json())
        for decision in reversed(list(self.env.decisions.values())):
            if decision.get("recipe") and self._model_key(decision["recipe"]) == key:
                return decision
        return None


class _Writer:
    """Records finished trials from one background thread while the next evaluation runs.

    ``flush`` waits for every submitted write and re-raises the first failure; the runner flushes
    before it reads the stage's results (completion, decision) and before a sampler suggests a trial.
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []

    def submit(self, func: Callable[..., None], *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="olmopt-writer")
        self._pending.append(self._pool.submit(func, *args))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Wait for the submitted writes, raising nothing (on an interrupt; a trial whose write failed stays
        RUNNING and is failed by the next start on SQLite, by its heartbeat on RDB storages)."""
        try:
            wait(self._pending)
        finally:
            self._pending = []
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class _Heartbeat:
    """Records heartbeats of in-flight trials (RDB storages) from a background thread."""

    def __init__(self, study: optuna.Study, in_flight: dict[Any, tuple[Trial, Recipe]]) -> None:
        self.study = study
        self.in_flight = in_flight
        self._stop = threading.Event()
        interval = study._storage.get_heartbeat_interval() or 30  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._loop, args=(max(1.0, interval / 2),), daemon=True)
        self._thread.start()

    def record(self, trial: Trial) -> None:
        try:
            self.study._storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a missed beat is retried next round
            pass

    def _loop(self, every: float) -> None:
        while not self._stop.wait(every):
            for trial, _recipe in list(self.in_flight.values()):
                self.record(trial)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
