"""Lock files that exist only while they are held (an exclusive ``flock``), so a finished or refused
command leaves none behind."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def held_lock(path: Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the duration; the file is created for it and removed on release.

    ``wait=False``: ``BlockingIOError`` at once when another process holds it (nothing is created then). A
    process that opened the file just before its holder removed it locks a file no longer at ``path``: it
    sees that and locks the current one, so two holders never overlap. ``OSError`` when the file cannot be
    created.
    """
    while True:
        handle = open(path, "a")  # noqa: SIM115 - closed on release below
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BaseException:
            handle.close()
            raise
        if _is_current(handle.fileno(), path):
            break
        handle.close()  # its holder removed it after we opened it
    try:
        yield
    finally:
        try:
            path.unlink()  # before unlocking: a waiter then finds its file gone and starts again
        except FileNotFoundError:
            pass
        handle.close()


def _is_current(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    try:
        at_path = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)
