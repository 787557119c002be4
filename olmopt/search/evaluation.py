"""The evaluation loop of one stage: claim a trial, decode it, submit it, collect its metrics, write them.

``StageEvaluation.run`` keeps up to K evaluations in flight (``Evaluators``), until every enqueued
candidate and the budget are done. One candidate's life is two methods: ``_start`` (decode the trial;
reuse the metrics of a model with the same weights, run a multi-evaluation trial inline, or submit
it) and ``_write`` (constraints, feasibility, user attrs, tell), which runs on a background thread
while the next evaluation runs. Meanwhile: heartbeats of in-flight trials (RDB storages), stale
sweeps and idempotent enqueueing of candidates that another worker's death left unevaluated.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm import tqdm

from olmopt.errors import OlmoptError
from olmopt.evaluate.early_stop import Scored, StopInputs
from olmopt.evaluate.item_scores import (
    N_ITEMS_ATTR,
    ItemScores,
    TrialItems,
    item_attrs,
    packed_items,
    unpack_all,
)
from olmopt.recipe import Recipe
from olmopt.search import trials as T
from olmopt.search.annotate import annotate_trial
from olmopt.search.campaign import Campaign
from olmopt.search.coordination import (
    POLL_SECONDS,
    WORKER_ID,
    StageLock,
    fail_dead_workers_trials,
    heartbeat_enabled,
    next_poll,
)
from olmopt.search.decision import Decision
from olmopt.search.eval_cache import EvalCache
from olmopt.search.identity import ModelKeys
from olmopt.search.kind import Stage, StageSpace
from olmopt.search.kind_registry import get_kind
from olmopt.search.near_ties import RACED_ATTR, RESUME_ATTR, NearTies, resumes
from olmopt.search.storage import is_sqlite, stale_after
from olmopt.search.workers import Evaluators
from olmopt.select import degradation_constraints, is_feasible, select

REUSE_CAP = 3  # a budget of N evaluations stops after 3 N trials however many repeat earlier ones
LIVE_STATES = (*T.DONE_STATES, TrialState.RUNNING, TrialState.WAITING)  # trials that spend the budget

InFlight = dict[Future[Scored], tuple[Trial, Recipe]]


def budget_spent(trials: list[FrozenTrial], budget: int) -> bool:
    """Whether ``trials`` (complete, pruned or running) use up a budget of ``budget`` evaluations."""
    evaluated = sum(T.costs_budget(t) for t in trials)
    return evaluated >= budget or len(trials) >= REUSE_CAP * budget


def budget_prefix(trials: list[FrozenTrial], budget: int) -> list[FrozenTrial] | None:
    """The live trials (not failed), in number order, up to the one that spends the ``budget``-th
    evaluation (None: fewer evaluations so far)."""
    ordered = sorted((t for t in trials if t.state in LIVE_STATES), key=lambda t: t.number)
    spent = 0
    for i, trial in enumerate(ordered):
        spent += T.costs_budget(trial)
        if spent >= budget:
            return ordered[: i + 1]
    return None


def stage_budget(trials: list[FrozenTrial], space: StageSpace) -> int | None:
    """The evaluations a stage may spend: ``space.budget``, plus its extension once the trials that spent
    the budget are all finished and the extension is due on their COMPLETE ones (``StageSpace.extension``)."""
    budget, extension = space.budget, space.extension
    if budget is None or extension is None:
        return budget
    prefix = budget_prefix(trials, budget)
    if prefix is None or any(t.state not in T.DONE_STATES for t in prefix):
        return budget
    complete = [t for t in prefix if t.state == TrialState.COMPLETE]
    return budget + extension.evaluations if extension.due(complete) else budget


def extension_granted(study: optuna.Study, space: StageSpace) -> int:
    """The evaluations a stage's extension has been granted (0: none; no storage read without one)."""
    if space.extension is None or space.budget is None:
        return 0
    return (stage_budget(study.get_trials(deepcopy=False), space) or 0) - space.budget


def stage_complete(
    study: optuna.Study, space: StageSpace, near_ties: NearTies | None = None
) -> tuple[bool, int]:
    """(every enqueued label and the budget are done, number of COMPLETE trials).

    A budget counts evaluations (``trials.costs_budget``): trials whose metrics were reused (a repeated
    suggestion, the incumbent again) or that repeated a stopped model on items already scored are free,
    up to ``REUSE_CAP`` times the budget in trials. With ``near_ties`` (racing) the race-stopped
    near-ties of the leader must have been resumed too (``search.near_ties``)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    done = [t for t in trials if t.state in T.DONE_STATES]  # a pruned candidate was evaluated (partly)
    done_labels = {str(t.user_attrs.get(T.LABEL_ATTR)) for t in done} | T.exhausted_labels(study)
    labels_done = all(label in done_labels for label, _ in space.enqueue)
    budget = stage_budget(trials, space)
    budget_done = budget is None or budget_spent(done, budget)
    finished = labels_done and budget_done
    if finished and near_ties is not None:
        finished = not near_ties.due(trials, T.exhausted_labels(study))
    return finished, len(complete)


class StageEvaluation:
    """Evaluates one stage's trials until the stage is complete (or time runs out)."""

    def __init__(
        self,
        campaign: Campaign,
        evaluators: Evaluators,
        study: optuna.Study,
        stage: Stage,
        space: StageSpace,
        incumbent: Recipe | None,
        references: dict[str, dict[str, float]],
        keys: ModelKeys,
        decisions: dict[str, Decision],
        out_of_time: Callable[[], bool],
        log: Callable[[str], None],
        cache: EvalCache | None = None,
    ) -> None:
        self.c = campaign
        self.ev = evaluators
        self.study = study
        self.stage = stage
        self.space = space
        self.incumbent = incumbent
        self.references = references
        self.keys = keys
        self.decisions = decisions  # earlier stages' decisions: a candidate with their weights reuses metrics
        self.out_of_time = out_of_time
        self.log = log
        self.cache = cache  # values across campaigns (search.eval_cache)
        self._fresh: set[int] = set()  # trials whose metrics this worker evaluated (put into the cache)
        self.names = campaign.objective_names()
        self.directions = campaign.directions()
        self.metric_of = dict(zip(self.names, (o.metric for o in campaign.config.objectives), strict=True))
        self.evaluated = 0  # trials this process finished
        self._in_flight: InFlight = {}
        self._beat: _Heartbeat | None = None
        self._writer = _Writer()
        ev = campaign.config.evaluation
        self.early_stop = ev.early_stop.mode == "on"
        self.racing = ev.racing.mode == "on" and get_kind(stage.kind).joint
        self._items_of = TrialItems()  # the stage's per-item values, unpacked once per trial
        self.reference = self._reference()
        self.near_ties = (
            NearTies(evaluators.local.stop_rule, self.names, ev.early_stop.alpha, self._items_of)
            if self.racing
            else None
        )

    def _reference(self) -> tuple[dict[str, float], ItemScores] | None:
        """The incumbent's metrics and per-item values (its decision's ``items``), early stopping on."""
        if not self.early_stop:
            return None
        earlier = self.keys.earlier_decision(self.incumbent, self.decisions)
        return (dict(earlier.metrics), unpack_all(earlier.items)) if earlier and earlier.items else None

    def _stop_inputs(self, race: bool = True) -> StopInputs | None:
        """What the candidate starting now is stopped against (docs/early_stop.md), read from the storage
        at its start: early stopping compares it with the stage's leader (the best feasible COMPLETE trial
        with per-item values by the stage's selection score; the incumbent among them) when the stage
        selects by that score (no acceptance rule of its kind), else with the incumbent; racing (joint
        stages) ranks it among the trials that have per-item values. With one worker every write has
        landed first, so the reads are those of a sequential run."""
        if not self.early_stop and not self.racing:
            return None
        self._writer.flush()
        done = [(t, self._items_of(t)) for t in self.study.get_trials(deepcopy=False, states=T.DONE_STATES)]
        done = [(t, items) for t, items in done if items]
        peers = [items for _, items in done] if self.racing and race else None
        if self.reference is None and (not self.early_stop or self.space.decide is not None):
            return StopInputs(peers=peers)
        entrants: dict[str, tuple[dict[str, float], ItemScores]] = {}
        if self.reference is not None:
            entrants["the incumbent"] = self.reference
        if self.space.decide is None:
            for t, items in done:
                if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible", True):
                    entrants[f"the stage's leader (trial {t.number})"] = (T.metrics_of(t, self.names), items)
        if not entrants:
            return StopInputs(peers=peers)
        scores = {
            n: {label: m.get(n, float("nan")) for label, (m, _) in entrants.items()} for n in self.names
        }
        leader = select(scores, self.directions, score=self.c.config.selection.score).winner
        assert leader is not None
        metrics, items = entrants[leader]
        return StopInputs(items, leader, metrics, peers)

    # -- enqueueing --------------------------------------------------------------------------------------
    def enqueue_missing(self) -> None:
        """Enqueue every candidate that has no waiting, running or complete trial (idempotent, locked).

        When another worker holds the stage's lock it is enqueueing them: this one goes on and takes
        trials as they appear (the loop calls this again while it waits).
        """
        candidates, attrs = list(self.space.enqueue), {}
        if self.near_ties is not None and stage_complete(self.study, self.space)[0]:
            for label, params, extra in resumes(self.near_ties.due(self.study.get_trials(deepcopy=False))):
                candidates.append((label, params))
                attrs[label] = extra
        if not candidates:
            return
        if is_sqlite(self.c.url):  # this process is the only writer: no lock
            T.enqueue_absent(self.study, candidates, attrs)
            return
        present = T.enqueued_labels(self.study) | T.exhausted_labels(self.study)
        if all(label in present for label, _ in candidates):
            return  # the common case while waiting: nothing to enqueue, no lock taken
        lock = StageLock(self.c.storage, self.c.stage_study_name(self.stage))
        if not lock.acquire():
            return
        try:
            T.enqueue_absent(self.study, candidates, attrs)
        finally:
            lock.release()

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, progress: bool = False, overall: tqdm | None = None, expected: int = 0) -> bool:
        """Evaluate until the stage is complete. False when stopped early (timeout).

        ``overall``: the campaign's bar, whose estimate of ``expected`` trials for this stage becomes
        what the stage really has left."""
        space, study = self.space, self.study
        total = space.budget if space.budget is not None else len(space.enqueue)
        _, complete = stage_complete(study, space)
        bar = tqdm(
            total=total, initial=min(complete, total), desc=f"stage {self.stage.key}", unit="trial",
            disable=not progress, leave=False,
        )  # fmt: skip
        remaining = max(total - complete, 0)
        if overall is not None:
            overall.total += remaining - expected
            overall.refresh()
        self._beat = _Heartbeat(study, self._in_flight) if heartbeat_enabled(self.c.storage) else None
        poll = POLL_SECONDS[0]
        try:
            while True:
                while len(self._in_flight) < self.ev.workers and not self.out_of_time():
                    trial = self._claim()
                    if trial is None:
                        break
                    poll = POLL_SECONDS[0]
                    self._start(trial)
                if not self._in_flight:
                    self._writer.flush()
                    grown = self._extension_granted(total)
                    if grown:  # the bars count the extension's trials too
                        total, remaining, bar.total = total + grown, remaining + grown, total + grown
                        if overall is not None:
                            overall.total += grown
                        continue
                    if stage_complete(study, space, self.near_ties)[0]:
                        return True
                    if self.out_of_time():
                        return False
                    self._sweep_stale()  # other workers' dead trials get failed ...
                    self.enqueue_missing()  # ... and their candidates retried (and near-ties resumed)
                    if T.has_waiting(study):
                        continue
                    time.sleep(poll)  # soon at first: the stage's last trials are about to finish
                    poll = next_poll(poll)
                    continue
                finished, _ = wait(self._in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    if self._collect(future):
                        bar.update(1)
                        if overall is not None:
                            overall.update(1)
                            remaining -= 1
        except (
            BaseException
        ):  # finished evaluations are still recorded (``finally``); the ones in flight fail
            for trial, _recipe in list(self._in_flight.values()):
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        finally:
            self._writer.close()
            if self._beat is not None:
                self._beat.stop()
            bar.close()
            if (
                overall is not None and remaining > 0
            ):  # others' trials, or fewer than budgeted: not ahead any more
                overall.total -= remaining
                overall.refresh()

    def _extension_granted(self, total: int) -> int:
        """The evaluations an extension granted beyond ``total`` (0: none, or counted already)."""
        granted = extension_granted(self.study, self.space)
        return max(0, (self.space.budget or 0) + granted - total) if granted else 0

    def _claim(self) -> Trial | None:
        """The next trial: an enqueued one, else (budgeted stages) a new suggestion while budget is left."""
        trial = T.pop_waiting(self.study)
        if trial is None and self.space.budget is not None:
            # the sampler sees every finished trial: the same suggestions as a sequential run
            self._writer.flush()
            live = self.study.get_trials(deepcopy=False, states=LIVE_STATES)  # a queued retry counts too
            budget = stage_budget(live, self.space)
            assert budget is not None
            if not budget_spent(live, budget):
                trial = self.study.ask()
        return trial

    def _start(self, trial: Trial) -> None:
        """Decode one claimed trial and put its evaluation in flight: reused metrics of a model with the same
        weights (an earlier decision, a repeat in this stage), a multi-evaluation trial run inline, or a
        submission to the evaluators."""
        try:
            label, recipe = self.space.decode(trial)
            if self._beat is not None:
                self._beat.record(trial)  # at once: a worker killed after this goes stale in one grace period
            if trial.user_attrs.get(T.LABEL_ATTR) is None:  # enqueued trials keep their label
                trial.set_user_attr(T.LABEL_ATTR, label)
            trial.set_user_attr("worker", WORKER_ID)
            if self.space.run is not None:
                self._run_inline(trial, recipe)
                return
            reused = self._reused_metrics(trial, recipe)
            known, stop = (Scored(reused), None) if reused is not None else self._known(trial, recipe)
            if known is not None:
                future: Future[Scored] = Future()
                future.set_result(known)
            else:  # inline when workers == 1; early stopping against the leader's or incumbent's items
                future = self.ev.submit(recipe, self.incumbent, self.space.layer, stop)
                self._fresh.add(trial.number)
        except BaseException:
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        self._in_flight[future] = (trial, recipe)

    def _reused_metrics(self, trial: Trial, recipe: Recipe) -> dict[str, float] | None:
        """The metrics of an earlier decision or (budgeted stages) of a COMPLETE trial of this stage with
        the same weights, noted in the trial's ``reused`` attr; None: evaluate it."""
        earlier = self.keys.earlier_decision(recipe, self.decisions)
        if earlier is not None:
            trial.set_user_attr(T.REUSED_ATTR, earlier.stage)
            return dict(earlier.metrics)
        same = self._same_model_in_stage(recipe) if self.space.budget else None
        if same is not None:
            trial.set_user_attr(T.REUSED_ATTR, f"trial {same.number}")
            return T.metrics_of(same, self.names)
        return None

    def _known(self, trial: Trial, recipe: Recipe) -> tuple[Scored | None, StopInputs | None]:
        """The result of ``trial`` when it needs no evaluation (from the evaluation cache), else what its
        evaluation is stopped against and starts from.

        A cache entry of the same model is noted in the trial's ``cached`` attr (the campaign that
        evaluated it); unlike ``reused`` it counts toward the budget, so a re-run replays the trials (and
        the decisions) of the first run. With chunked evaluation the entry's per-item values are
        replayed through the stopping rule (a candidate stopped early stops again where it did); when
        they lack a chunk the rule needs, or for a resume trial (``search.near_ties``), the evaluation
        reads the values it has and scores only the rest."""
        resumed = RESUME_ATTR in trial.user_attrs
        stop = self._stop_inputs(race=not resumed)
        known: ItemScores = self._resumed_items(int(trial.user_attrs[RESUME_ATTR])) if resumed else {}
        hit = self.cache.get(self.keys.key_of_json(recipe.to_json()), "search") if self.cache else None
        local = self.ev.local
        if hit is not None:
            items = unpack_all(hit.items)
            if not local.chunked_for(recipe):
                if not hit.partial:
                    trial.set_user_attr("cached", hit.campaign)
                    return Scored(hit.values, items), None
            else:
                replayed = local.replay(recipe, items, stop)
                if replayed is not None:
                    trial.set_user_attr("cached", hit.campaign)
                    return replayed, None
                for name, per in items.items():
                    known.setdefault(name, {}).update(per)
        if known:
            stop = replace(stop or StopInputs(), known=known)
        return None, stop

    def _resumed_items(self, number: int) -> ItemScores:
        """The per-item values of race-stopped trial ``number`` (a resume trial's start)."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)):
            if t.number == number:
                return {name: dict(per) for name, per in self._items_of(t).items()}
        return {}

    def _repeat_of(self, trial: Trial, recipe: Recipe, items: ItemScores) -> int | None:
        """The first earlier trial of this (budgeted) stage with the same model when, together, such
        trials had scored every item of ``items``: a sampler repeating a stopped candidate learns nothing
        new, so the repeat costs no budget. Decided from the stage's trials only, so a re-run from the
        evaluation cache decides the same."""
        stops = self.early_stop or self.racing  # else a repeated model has a COMPLETE twin: ``reused``
        if not items or not stops or not self.space.budget or RESUME_ATTR in trial.user_attrs:
            return None
        earlier = [t for t in self._same_model(recipe, T.DONE_STATES) if t.number < trial.number]
        scored: dict[str, set[int]] = {}
        for t in earlier:
            for name, per in self._items_of(t).items():
                scored.setdefault(name, set()).update(per)
        if earlier and all(set(per) <= scored.get(name, set()) for name, per in items.items()):
            return min(t.number for t in earlier)
        return None

    def _same_model_in_stage(self, recipe: Recipe) -> FrozenTrial | None:
        """A COMPLETE trial of this stage with the same weights (a sampler repeating itself)."""
        return next(self._same_model(recipe, (TrialState.COMPLETE,)), None)

    def _same_model(self, recipe: Recipe, states: tuple[TrialState, ...]) -> Iterator[FrozenTrial]:
        """This stage's trials in ``states`` whose Recipe has the same weights as ``recipe``, lazily (the
        reuse check stops at the first)."""
        recipe_json = recipe.to_json()
        for t in self.study.get_trials(deepcopy=False, states=states):
            if (other := t.user_attrs.get(T.RECIPE_ATTR)) and self.keys.same_json(str(other), recipe_json):
                yield t

    def _run_inline(self, trial: Trial, recipe: Recipe) -> None:
        """A multi-evaluation trial, in this process; listed in flight meanwhile (heartbeats, interrupts)."""
        assert self.space.run is not None
        future: Future[Scored] = Future()
        self._in_flight[future] = (trial, recipe)
        try:
            final, metrics = self.space.run(trial, recipe)
        except OlmoptError:
            del self._in_flight[future]
            raise
        except Exception as exc:  # noqa: BLE001 - reported through the future, like a worker's failure
            future.set_exception(exc)
            return
        self._in_flight[future] = (trial, final)
        future.set_result(Scored(metrics))

    def _collect(self, future: Future[Scored]) -> bool:
        """Hand a finished evaluation to the writer (or fail its trial). True when it is to be written."""
        trial, recipe = self._in_flight[future]  # stays listed until told, so an interrupt fails it
        try:
            scored = future.result()
        except OlmoptError:
            raise  # the user's input is wrong: every trial would fail the same way
        except Exception as exc:  # noqa: BLE001 - a numerical failure rejects this candidate only
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:300])
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            self.log(f"{self.stage.key}: trial {trial.number} failed ({type(exc).__name__}: {exc})")
            del self._in_flight[future]
            return False
        self._writer.submit(self._write, trial, recipe, scored)  # the next evaluation starts now
        del self._in_flight[future]
        self.evaluated += 1
        return True

    def _write(self, trial: Trial, recipe: Recipe, scored: Scored) -> None:
        """Record one candidate's results on its trial and tell it (on the writer thread): COMPLETE, or
        PRUNED with its partial metrics and the reason when early stopping stopped it. Per-item values and
        ``n_items`` (0 for reused metrics; absent for a multi-evaluation trial) go with them."""
        metrics = scored.metrics
        extra: dict[str, Any] = item_attrs(scored.items) if scored.items else {}
        if scored.items:
            extra[N_ITEMS_ATTR] = scored.n_items  # the items read from earlier results cost nothing
        if T.REUSED_ATTR in trial.user_attrs or "cached" in trial.user_attrs:  # no item was evaluated
            extra[N_ITEMS_ATTR] = 0
        if (repeat := self._repeat_of(trial, recipe, scored.items)) is not None:
            extra[T.REPEAT_ATTR] = repeat
        if scored.stopped:
            extra[T.PRUNED_ATTR] = scored.stopped
        if scored.raced:
            extra[RACED_ATTR] = True
        refs = self.references
        rule = self.c.config.selection.improve_all
        constraints = (
            degradation_constraints(metrics, refs, self.directions, rule, self.metric_of)
            if "base" in refs
            else {}
        )
        nonfinite = T.nonfinite_objectives(metrics, self.names)  # a damaged model: infeasible, and why
        try:
            T.record_result(
                trial,
                metrics,
                constraints,
                is_feasible(constraints) and not nonfinite,
                recipe.to_json(),
                extra,
            )
            if nonfinite:
                trial.set_user_attr(
                    T.INFEASIBLE_ATTR, f"non-finite outputs (NaN/inf logits) on {', '.join(nonfinite)}"
                )
        except optuna.exceptions.UpdateFinishedTrialError:  # its beats were late: another worker failed it
            self.log(
                f"trial {trial.number}: failed meanwhile by another worker's heartbeat sweep; evaluated again"
            )
            return
        annotate_trial(self.c, trial, recipe.to_json())  # before tell: a finished trial takes no artifacts
        if scored.stopped:  # Trial.report is refused in multi-objective studies: told directly
            self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(trial, T.told_values(metrics, self.names, self.directions), skip_if_finished=True)
        if self.cache is not None and trial.number in self._fresh:  # stopped ones too: a re-run replays them
            key = self.keys.key_of_json(recipe.to_json())
            self.cache.put(key, "search", metrics, packed_items(extra), partial=bool(scored.stopped))

    def _sweep_stale(self) -> None:
        """Fail trials of dead workers (so that their candidates are retried)."""
        if not is_sqlite(self.c.url):  # SQLite has a single writer: its orphans were failed at stage start
            fail_dead_workers_trials(self.study, self.c.storage, stale_after())


class _Writer:
    """Records finished trials from one background thread while the next evaluation runs.

    ``flush`` waits for every submitted write and re-raises the first failure; the loop flushes
    before it reads the stage's results (completion) and before a sampler suggests a trial.
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

    def __init__(self, study: optuna.Study, in_flight: InFlight) -> None:
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
