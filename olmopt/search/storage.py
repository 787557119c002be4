"""Storage URLs: defaults, validation, credential redaction, heartbeats, and the SQLite single-writer lock."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from olmopt.defaults import DEFAULT_STORAGE
from olmopt.envvars import env_float, env_int
from olmopt.errors import StorageError

HEARTBEAT_INTERVAL = 20
GRACE_PERIOD = 60
STALE_AFTER = 900  # journal storages have no heartbeat: RUNNING longer than this is presumed dead


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds; OLMOPT_HEARTBEAT_INTERVAL / OLMOPT_HEARTBEAT_GRACE override."""
    interval = env_int("OLMOPT_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
    grace = env_int("OLMOPT_HEARTBEAT_GRACE", max(GRACE_PERIOD, 3 * interval))
    return interval, grace


def stale_after() -> float:
    return env_float("OLMOPT_STALE_AFTER", STALE_AFTER)


def default_storage_url(cwd: Path | None = None) -> str:
    """The embedded SQLite default, resolved once to an absolute path: ``storage/olmopt.db`` in the
    current directory or in the nearest parent directory that has one (as git finds ``.git``), else in
    the current directory (where ``study create`` makes it)."""
    here = (cwd or Path.cwd()).resolve()
    relative = Path(DEFAULT_STORAGE.removeprefix("sqlite:///"))
    for directory in (here, *here.parents):
        if (directory / relative).is_file():
            return f"sqlite:///{directory / relative}"
    return f"sqlite:///{here / relative}"


def resolve_storage(flag: str | None = None, from_file: str | None = None) -> tuple[str, str]:
    """(url, where it came from): --storage, then $OLMOPT_STORAGE, then the study file's ``storage:``
    (``study create`` only), then the default (`default_storage_url`)."""
    if flag:
        return flag, "--storage"
    env = os.environ.get("OLMOPT_STORAGE")
    if env:
        return env, "$OLMOPT_STORAGE"
    if from_file:
        return from_file, "the study file"
    return default_storage_url(), "default"


def storage_url(flag: str | None = None, from_file: str | None = None) -> str:
    """The storage URL `resolve_storage` picks."""
    return resolve_storage(flag, from_file)[0]


def missing_storage(url: str) -> Path | None:
    """The file of a SQLite or journal storage that does not exist yet (None for servers, or when it exists)."""
    try:
        path = Path(url.removeprefix("journal:")) if url.startswith("journal:") else sqlite_path(url)
    except ArgumentError:
        return None  # open_storage names the malformed URL
    return path if path is not None and not path.is_file() else None


def no_storage_error(path: Path) -> StorageError:
    return StorageError(
        f"no storage at {path.absolute()} (nothing created; pass --storage URL or set OLMOPT_STORAGE, "
        "or create a campaign there first)"
    )


def redact(url: str) -> str:
    """The URL with any password removed (for messages, logs, reports)."""
    if url.startswith("journal:"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # show what the user typed, less any password
        return re.sub(r"(://[^/:@]*):[^/]*@", r"\1:***@", url)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def sqlite_path(url: str) -> Path | None:
    if not is_sqlite(url):
        return None
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def open_storage(url: str, heartbeat: bool = True, create: bool = True) -> optuna.storages.BaseStorage:
    """Open (and for SQLite create the directory of) a storage; one-line StorageError on failure.
    ``create=False`` (read-only commands): a SQLite or journal file that does not exist is an error,
    and nothing is created."""
    if not create and (missing := missing_storage(url)) is not None:
        raise no_storage_error(missing)
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        journal = Path(url.removeprefix("journal:"))
        _make_parent(journal, url)
        try:
            return JournalStorage(JournalFileBackend(str(journal)))
        except OSError as exc:
            raise StorageError(f"cannot open storage {url}: {exc.strerror or type(exc).__name__} ({journal})") from None
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # a port that is not a number raises ValueError
        raise StorageError(f"malformed storage URL {redact(url)!r} (e.g. sqlite:///storage/olmopt.db)") from None
    if parsed.drivername.split("+")[0] == "postgres":  # libpq's scheme; SQLAlchemy knows only postgresql
        fixed = redact(url).replace(parsed.drivername, "postgresql+psycopg", 1)
        raise StorageError(f"unsupported storage 'postgres': SQLAlchemy spells it postgresql, e.g. {fixed}")
    if parsed.drivername.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(f"unsupported storage {parsed.drivername!r}: use sqlite, postgresql, mysql or journal:PATH")
    path = sqlite_path(url)
    if path is not None:
        _make_parent(path, url)
    kwargs: dict[str, object] = {}
    if heartbeat and not is_sqlite(url):
        interval, grace = heartbeat_settings()
        kwargs = {
            "heartbeat_interval": interval,
            "grace_period": grace,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=3),
        }
    try:
        storage = RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {redact(url)}: {reason}") from None
    if is_sqlite(url):
        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # reconnect so the pragmas apply to every pooled connection
    return storage


def _make_parent(path: Path, url: str) -> None:
    """Create the folder of a storage file; one that cannot be created (under a file, read-only, /proc) is
    a one-line StorageError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot open storage {redact(url)}: cannot create the folder {path.parent} ({exc.strerror or type(exc).__name__})"
        ) from None
    if path.is_dir():
        raise StorageError(f"cannot open storage {redact(url)}: {path} is a directory")


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    """WAL + synchronous=NORMAL: an order of magnitude fewer fsyncs per trial, still crash-consistent."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def sqlite_busy(url: str) -> bool:
    """Whether an olmopt process holds the single-writer lock of a SQLite storage (creates nothing)."""
    path = sqlite_path(url)
    lock_path = path.with_name(path.name + ".lock") if path is not None else None
    if lock_path is None or not lock_path.is_file():
        return False
    with open(lock_path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts only with a writer's exclusive lock
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextmanager
def single_writer(url: str) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite file for the duration (several writers corrupt the queue)."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    _make_parent(lock_path, url)
    try:
        handle = open(lock_path, "w")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise StorageError(f"cannot lock storage {redact(url)}: {lock_path}: {exc.strerror or type(exc).__name__}") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(
                f"another olmopt process is running on {path}; SQLite cannot be shared by several processes "
                "(use --workers K in one process, or a PostgreSQL/MySQL storage for several workers)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
