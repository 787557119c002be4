"""Storage URLs: defaults, validation, credential redaction, heartbeats, connection retries, and the SQLite
single-writer lock."""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage
from sqlalchemy import event
from sqlalchemy.dialects import plugins
from sqlalchemy.engine import URL, CreateEnginePlugin, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from olmopt.defaults import DEFAULT_STORAGE
from olmopt.envvars import env_float, env_int
from olmopt.errors import StorageError
from olmopt.lockfile import held_lock
from olmopt.search.coordination import RetrySampledTrial
from olmopt.search.trials import MAX_FAILURES

HEARTBEAT_INTERVAL = 5  # a live worker beats every half interval
GRACE_PERIOD = 20  # a trial whose beats stopped this long ago is its dead worker's: failed, evaluated again
STALE_AFTER = 900  # journal storages have no heartbeat: RUNNING longer than this is presumed dead
CONNECT_GRACE = 10  # seconds a storage server may refuse connections before the one-line error


def heartbeat_settings() -> tuple[int, int]:
    """(interval, grace period) in seconds; OLMOPT_HEARTBEAT_INTERVAL / OLMOPT_HEARTBEAT_GRACE override."""
    interval = env_int("OLMOPT_HEARTBEAT_INTERVAL", HEARTBEAT_INTERVAL)
    grace = env_int("OLMOPT_HEARTBEAT_GRACE", max(GRACE_PERIOD, 3 * interval))
    return interval, grace


def stale_after() -> float:
    return env_float("OLMOPT_STALE_AFTER", STALE_AFTER)


def connect_grace() -> int:
    """Seconds to keep retrying a storage server that refuses connections; OLMOPT_STORAGE_GRACE (0: none)."""
    return env_int("OLMOPT_STORAGE_GRACE", CONNECT_GRACE, minimum=0)


class RetryConnect(CreateEnginePlugin):
    """SQLAlchemy engine plugin: every new connection (the first one, and a reconnection after the server
    went away mid-run) is retried for ``olmopt_connect_grace`` seconds, backing off from 0.2 s to 2 s."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        super().__init__(url, kwargs)
        self.grace = float(kwargs.pop("olmopt_connect_grace", 0))

    def update_url(self, url: URL) -> URL:
        return url  # takes no URL parameters

    def engine_created(self, engine: Engine) -> None:
        event.listen(engine, "do_connect", self._connect)

    def _connect(self, dialect: Any, _record: object, cargs: tuple[Any, ...], cparams: dict[str, Any]) -> Any:
        deadline = time.monotonic() + self.grace
        delay = 0.2
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                time.sleep(min(delay, remaining))  # the last try comes at the end of the grace
                delay = min(2 * delay, 2.0)


plugins.register("olmopt_retry_connect", __name__, "RetryConnect")


def server_engine_kwargs(grace: int) -> dict[str, Any]:
    """``create_engine`` arguments of a server storage: dead pooled connections replaced, new ones retried."""
    return {"pool_pre_ping": True, "plugins": ["olmopt_retry_connect"], "olmopt_connect_grace": grace}


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
    """The file of a SQLite or journal storage that does
    not exist yet (None for servers, or when it exists)."""
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
            raise StorageError(
                f"cannot open storage {url}: {exc.strerror or type(exc).__name__} ({journal})"
            ) from None
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # a port that is not a number raises ValueError
        raise StorageError(
            f"malformed storage URL {redact(url)!r} (e.g. sqlite:///storage/olmopt.db)"
        ) from None
    if parsed.drivername.split("+")[0] == "postgres":  # libpq's scheme; SQLAlchemy knows only postgresql
        fixed = redact(url).replace(parsed.drivername, "postgresql+psycopg", 1)
        raise StorageError(f"unsupported storage 'postgres': SQLAlchemy spells it postgresql, e.g. {fixed}")
    if parsed.drivername.split("+")[0] not in ("sqlite", "postgresql", "mysql"):
        raise StorageError(
            f"unsupported storage {parsed.drivername!r}: use sqlite, postgresql, mysql or journal:PATH"
        )
    path = sqlite_path(url)
    if path is not None:
        _make_parent(path, url)
    server = not is_sqlite(url)
    grace = connect_grace() if server else 0
    if not create and server and not _has_optuna_tables(url, grace):
        raise StorageError(
            f"no storage in {redact(url)}: the database holds no Optuna tables (nothing created; "
            "pass --storage URL or set OLMOPT_STORAGE, or create a campaign there first)"
        )
    kwargs: dict[str, object] = {}
    if heartbeat and server:
        interval, hb_grace = heartbeat_settings()
        kwargs = {
            "heartbeat_interval": interval,
            "grace_period": hb_grace,
            "heartbeat_stale_trial_callback": RetrySampledTrial(max_retry=MAX_FAILURES),
        }
    engine_kwargs = server_engine_kwargs(grace) if server else {"pool_pre_ping": True}
    try:
        storage = RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)  # type: ignore[arg-type]
    except Exception as exc:
        raise _open_error(url, exc, grace) from None
    if is_sqlite(url):
        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # reconnect so the pragmas apply to every pooled connection
    return storage


def _has_optuna_tables(url: str, grace: int) -> bool:
    """Whether a server database already holds Optuna's tables (read-only commands never create them)."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, **server_engine_kwargs(grace))
    try:
        with engine.connect() as conn:
            return bool(inspect(conn).has_table("version_info"))
    except Exception as exc:
        raise _open_error(url, exc, grace) from None
    finally:
        engine.dispose()


def _open_error(url: str, exc: Exception, grace: int) -> StorageError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    retried = ""
    if grace and isinstance(exc, OperationalError):  # the server refused every try within the grace
        retried = f" (retried for {grace} s; OLMOPT_STORAGE_GRACE sets how long)"
    return StorageError(f"cannot open storage {redact(url)}: {reason}{retried}")


def _make_parent(path: Path, url: str) -> None:
    """Create the folder of a storage file; one that cannot be created (under a file, read-only, /proc) is
    a one-line StorageError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot open storage {redact(url)}: cannot create the folder {path.parent} "
            f"({exc.strerror or type(exc).__name__})"
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
    if lock_path is None:
        return False
    try:
        handle = open(lock_path)  # noqa: SIM115 - closed below
    except FileNotFoundError:  # no lock file: nobody holds it
        return False
    with handle:
        try:
            fcntl.flock(
                handle, fcntl.LOCK_SH | fcntl.LOCK_NB
            )  # conflicts only with a writer's exclusive lock
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


@contextmanager
def single_writer(url: str) -> Iterator[None]:
    """Hold an exclusive lock on a SQLite file for the duration (several writers corrupt the queue); its lock
    file ``DB.lock`` exists only while it is held."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock_path = path.with_name(path.name + ".lock")
    _make_parent(lock_path, url)
    with ExitStack() as stack:
        try:
            stack.enter_context(held_lock(lock_path, wait=False))
        except BlockingIOError:
            raise StorageError(
                f"another olmopt process is running on {path}; SQLite cannot be shared by several processes "
                "(use --workers K in one process, or a PostgreSQL/MySQL storage for several workers)"
            ) from None
        except OSError as exc:
            raise StorageError(
                f"cannot lock storage {redact(url)}: {lock_path}: {exc.strerror or type(exc).__name__}"
            ) from None
        yield
