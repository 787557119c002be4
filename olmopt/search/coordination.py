"""Coordination of several workers through the storage itself (no other service needed).

``StageLock`` is a mutex built on Optuna's unique study names: creating the study ``{stage}#lock``
succeeds for exactly one worker; the others wait until it is deleted (or older than ``stale_after``
seconds, when its holder is presumed dead). It guards the enqueueing of a stage's candidates, which is
also idempotent, so a crash between enqueueing and unlocking loses nothing.
"""

from __future__ import annotations

import time
from types import TracebackType

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage, RDBStorage

LOCK_ATTR = "olmopt.lock_acquired"


def heartbeat_enabled(storage: BaseStorage) -> bool:
    return isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None


class StageLock:
    def __init__(self, storage: BaseStorage, name: str, stale_after: float = 120.0, poll: float = 0.2) -> None:
        self.storage = storage
        self.name = f"{name}#lock"
        self.stale_after = stale_after
        self.poll = poll

    def __enter__(self) -> StageLock:
        while True:
            try:
                study = optuna.create_study(storage=self.storage, study_name=self.name)
                study.set_user_attr(LOCK_ATTR, time.time())
                return self
            except DuplicatedStudyError:
                self._break_if_stale()
                time.sleep(self.poll)

    def _break_if_stale(self) -> None:
        try:
            study = optuna.load_study(storage=self.storage, study_name=self.name)
        except KeyError:
            return
        acquired = study.user_attrs.get(LOCK_ATTR)
        if acquired is not None and time.time() - float(acquired) > self.stale_after:
            self._delete()

    def _delete(self) -> None:
        try:
            optuna.delete_study(storage=self.storage, study_name=self.name)
        except KeyError:
            pass

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._delete()
