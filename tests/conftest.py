"""Session-wide test setup: one torch thread, and the cached tiny llama zoo as fixtures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

# A shell that starts the suite in the background makes it ignore SIGINT, and child processes inherit
# that: the Ctrl-C tests could not interrupt their `olmopt` children. Handle it as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ["OLMOPT_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
# an unreachable storage server fails at once (the retry grace has its own test in test_bad_input.py)
os.environ.setdefault("OLMOPT_STORAGE_GRACE", "0")
# the zoo's portable CPU kernels for the whole suite: the tiny zoo is built in this process, and
# figures are the same on every x86-64 machine (olmopt.kernels)
from olmopt.kernels import request_portable_kernels  # noqa: E402 - torch-free

request_portable_kernels()

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_ZOO_DIR = REPO_ROOT / "storage" / "zoo-tiny"


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny llama zoo at storage/zoo-tiny (built once,
    ~1.5 min; reused while zoo.json and hashes match)."""
    from olmopt.zoo import build_zoo

    # storage/zoo-tiny is the suite's own cache: one from an older zoo version is rebuilt, not refused
    build_zoo(TINY_ZOO_DIR, size="tiny", arch="llama", progress=False, refresh=True)
    return TINY_ZOO_DIR


@pytest.fixture(scope="session")
def tiny_manifest(tiny_zoo: Path) -> dict[str, Any]:
    """The parsed zoo.json of the tiny zoo."""
    from olmopt.zoo import load_manifest

    return load_manifest(tiny_zoo)


class CliProcesses:
    """``olmopt`` commands a test runs in child processes. Their output goes to files, so a chatty child
    cannot block on a full pipe, and every child still running when the test ends is killed."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``python -m olmopt.cli ARGS`` with one torch thread (and ``env`` on top of ours)."""
        n = len(self.procs)
        full_env = dict(os.environ, OLMOPT_THREADS="1", OMP_NUM_THREADS="1", **(env or {}))
        with (
            open(self.log_dir / f"cli-{n}.out", "wb") as out,
            open(self.log_dir / f"cli-{n}.err", "wb") as err,
        ):
            proc = subprocess.Popen(
                [sys.executable, "-m", "olmopt.cli", *args], env=full_env, stdout=out, stderr=err
            )
        self.procs.append(proc)
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.log_dir / f"cli-{self.procs.index(proc)}.err").read_text(errors="replace")

    def finish(self, proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
        """Wait for ``proc`` (TimeoutExpired after ``timeout`` s); its exit code and standard error."""
        return proc.wait(timeout=timeout), self.stderr(proc)

    def interrupt_when(
        self, proc: subprocess.Popen[bytes], url: str, study_name: str, ready: Callable[[list[Any]], bool]
    ) -> None:
        """Ctrl-C ``proc`` once ``ready(trials)`` holds for stage study ``study_name`` at ``url`` (or after
        300 s, or at once when ``proc`` has ended), and wait for it to exit."""
        import optuna

        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if ready(optuna.load_study(study_name=study_name, storage=url).get_trials()):
                    break
            except KeyError:  # the stage has not started
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliProcesses]:
    """Run ``olmopt`` commands as child processes; none outlives the test."""
    procs = CliProcesses(tmp_path_factory.mktemp("cli"))
    try:
        yield procs
    finally:
        procs.kill_all()
