"""Where candidates are evaluated: in this process, or in K local worker processes.

Only the coordinating process talks to the storage (so the embedded SQLite default stays safe); the
workers receive Recipes as JSON (and the incumbent's per-item values, for early stopping) and send back
objective values with their per-item values (``Scored``). Each worker owns one resident model
(and one CUDA device where several exist).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from olmopt.config import StudyConfig
from olmopt.evaluate.early_stop import Scored, StopInputs
from olmopt.recipe import Recipe

if TYPE_CHECKING:  # torch and transformers: imported where a model is loaded
    from olmopt.search.context import EvalContext

_WORKER_CTX: EvalContext | None = None


def _die_with(parent: int) -> None:
    """End this worker when its coordinator ends, even by ``kill -9`` (Linux: the parent-death signal)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the coordinator died before the signal was armed
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _init_worker(config_json: dict[str, Any], index_queue: Any, parent: int) -> None:
    global _WORKER_CTX
    _die_with(parent)
    import torch

    from olmopt.runtime import configure_threads
    from olmopt.search.context import EvalContext

    configure_threads(1)
    config = StudyConfig.model_validate(config_json)
    index = index_queue.get()
    if torch.cuda.is_available() and torch.cuda.device_count() > 1 and not config.evaluation.device:
        config = config.model_copy(
            update={
                "evaluation": config.evaluation.model_copy(
                    update={"device": f"cuda:{index % torch.cuda.device_count()}"}
                )
            }
        )
    _WORKER_CTX = EvalContext(config)


def _ready() -> bool:
    return _WORKER_CTX is not None


def _score_task(
    recipe_json: str, incumbent_json: str | None, layer: int | None, stop: StopInputs | None
) -> Scored:
    assert _WORKER_CTX is not None
    incumbent = Recipe.from_json(incumbent_json) if incumbent_json else None
    return _WORKER_CTX.evaluate(Recipe.from_json(recipe_json), "search", incumbent, layer, stop)


class Evaluators:
    """Submit candidate evaluations; ``workers == 1`` runs them inline in this process."""

    def __init__(self, config: StudyConfig, workers: int = 1, context: EvalContext | None = None) -> None:
        self.config = config
        self.workers = max(1, workers)
        self._local = context
        self._pool: ProcessPoolExecutor | None = None
        if self.workers > 1:
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()  # handed over at spawn; no manager process that could outlive us
            for i in range(self.workers):
                queue.put(i)
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(config.model_dump(mode="json"), queue, os.getpid()),
            )
            # start every worker now (the pool spawns one per pending task): their model loads overlap
            # this process's own start-up instead of delaying the first trials
            for _ in range(self.workers):
                self._pool.submit(_ready)

    @property
    def local(self) -> EvalContext:
        """An in-process context (built on first use) for held-out checks and single-worker runs."""
        if self._local is None:
            from olmopt.search.context import EvalContext

            self._local = EvalContext(self.config)
        return self._local

    def submit(
        self, recipe: Recipe, incumbent: Recipe | None, layer: int | None, stop: StopInputs | None = None
    ) -> Future[Scored]:
        """Evaluate ``recipe`` on the search split; ``stop``: what early stopping and racing compare with."""
        if self._pool is None:
            future: Future[Scored] = Future()
            try:
                future.set_result(self.local.evaluate(recipe, "search", incumbent, layer, stop))
            except BaseException as exc:  # noqa: BLE001 - surfaced through the future
                if isinstance(exc, KeyboardInterrupt):
                    raise
                future.set_exception(exc)
            return future
        return self._pool.submit(
            _score_task, recipe.to_json(), incumbent.to_json() if incumbent else None, layer, stop
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
