"""Coordination of several workers through the storage itself (no other service needed).

``StageLock`` is a mutex built on Optuna's unique study names: creating the study ``{stage}#lock``
succeeds for exactly one worker; the others wait until it is deleted (or older than ``stale_after``
seconds, when its holder is presumed dead). It guards the enqueueing of a stage's candidates, which is
also idempotent, so a crash between enqueueing and unlocking loses nothing. A worker that finds the lock
taken does not wait for it: it evaluates the candidates as they appear (``acquire``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TypeGuard

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

LOCK_ATTR = "olmopt.lock_acquired"
ENQUEUED_ATTR = "fixed_params"  # Optuna's system attr of an enqueued trial (and of its retries)
POLL_SECONDS = (0.05, 1.0)  # waiting for other workers: first poll, then x1.5 up to the second
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # names this process in trials and decisions


def next_poll(poll: float) -> float:
    return min(POLL_SECONDS[1], poll * 1.5)


def heartbeat_enabled(storage: BaseStorage) -> TypeGuard[RDBStorage]:
    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None


def fail_dead_workers_trials(study: optuna.Study, storage: BaseStorage, stale_after: float) -> list[int]:
    """Fail the RUNNING trials of workers that died; returns the numbers it failed beyond Optuna's sweep.

    With heartbeats (RDB storages): a trial whose beats stopped (Optuna's ``fail_stale_trials``), and a
    trial that never beat for 3 intervals: a worker beats a trial as soon as it takes it and then every
    half interval, so its worker died at once (Optuna skips such trials); both go through the storage's
    stale-trial callback (`RetrySampledTrial`). Without heartbeats (journal storages): a trial RUNNING for
    longer than ``stale_after`` seconds. ``storage`` is the one the study was loaded from (a study wraps an
    RDB storage in a cache that hides its heartbeat settings). Each trial is failed by one worker only: the
    storage changes its state under a row lock.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    callback = None
    if heartbeat_enabled(storage):
        optuna.storages.fail_stale_trials(study)
        beating = trials_with_heartbeat(storage, [t._trial_id for t in running])
        running = [t for t in running if t._trial_id not in beating]
        stale_after = 3 * (storage.get_heartbeat_interval() or 30)
        callback = storage.get_heartbeat_stale_trial_callback()
    limit = datetime.datetime.now() - datetime.timedelta(seconds=stale_after)
    failed: list[int] = []
    for t in running:
        if t.datetime_start is None or t.datetime_start >= limit:
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # finished or failed by another worker meanwhile
            continue
        failed.append(t.number)
        if callback is not None:
            callback(study, study._storage.get_trial(t._trial_id))
    return failed


class RetrySampledTrial(RetryHeartbeatStaleTrialCallback):
    """The stale-trial callback of olmopt's RDB storages: a dead worker's trial is queued again (up to
    ``max_retry`` times) when a sampler suggested it. An enqueued candidate is not: the runner's idempotent
    enqueue, under the stage's lock, queues every candidate that has no live trial, so a second copy made
    here (outside that lock) could be evaluated and completed twice."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if ENQUEUED_ATTR not in trial.system_attrs:
            super().__call__(study, trial)


def trials_with_heartbeat(storage: RDBStorage, trial_ids: list[int]) -> set[int]:
    """Which of ``trial_ids`` have a heartbeat row (Optuna 5 has no public query for it)."""
    if not trial_ids:
        return set()
    from optuna.storages._rdb.models import TrialHeartbeatModel
    from sqlalchemy import select

    column = TrialHeartbeatModel.__table__.c.trial_id
    with storage.engine.connect() as conn:
        return {int(row[0]) for row in conn.execute(select(column).where(column.in_(trial_ids)))}


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM (Ctrl-C, a scheduler's stop) until the block ends, where they are
    raised. Taking a lock is a storage write whose outcome an interrupt inside it would hide: the row may
    be committed while the caller never learns it holds the lock. Keep the block to that write (a server
    that refuses connections holds Ctrl-C back for up to ``OLMOPT_STORAGE_GRACE`` seconds).

    The block swaps the Python handlers for ones that only note the signal, then restores them and raises
    what was noted. A thread's signal mask would not do: the kernel hands a process-wide signal to any
    thread that does not block it (torch's, a heartbeat's), and Python then runs the handler in the main
    thread all the same. Only the main thread may set handlers; elsewhere (and where a handler was set
    outside Python, so it cannot be restored) the block runs as is."""
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in held}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: object) -> None:
        noted.append(signum)

    for signum in held:
        signal.signal(signum, note)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for raised in dict.fromkeys(noted):  # restored handlers run now: KeyboardInterrupt, or the default
            signal.raise_signal(raised)


class StageLock:
    def __init__(
        self, storage: BaseStorage, name: str, stale_after: float = 120.0, poll: float = 0.2
    ) -> None:
        self.storage = storage
        self.name = f"{name}#lock"
        self.stale_after = stale_after
        self.poll = poll
        self._unstamped_since: float | None = None  # when this worker first saw the lock without a time

    def __enter__(self) -> StageLock:
        while not self.acquire():
            time.sleep(self.poll)
        return self

    def acquire(self) -> bool:
        """Take the lock if it is free (or its holder presumed dead); False when another worker holds it."""
        held = False
        try:
            with interrupts_deferred():
                try:
                    study = optuna.create_study(storage=self.storage, study_name=self.name)
                except DuplicatedStudyError:
                    pass
                else:
                    held = True
                    study.set_user_attr(LOCK_ATTR, time.time())
        except BaseException:  # Ctrl-C while taking or stamping it: do not leave a lock the others wait out
            if held:
                self._delete()
            raise
        if not held:
            self._break_if_stale()
        return held

    def release(self) -> None:
        self._delete()

    def _break_if_stale(self) -> None:
        """Delete a lock held for longer than ``stale_after``
        (one without a time: since this worker saw it)."""
        try:
            acquired = optuna.load_study(storage=self.storage, study_name=self.name).user_attrs.get(LOCK_ATTR)
        except KeyError:  # released meanwhile
            return
        if acquired is None:  # its holder died between creating it and stamping it, or is stamping it now
            self._unstamped_since = self._unstamped_since or time.time()
            acquired = self._unstamped_since
        if time.time() - float(acquired) > self.stale_after:
            self._delete()

    def _delete(self) -> None:
        try:
            optuna.delete_study(storage=self.storage, study_name=self.name)
        except KeyError:
            pass

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._delete()
