"""Where an engine runs, hidden behind a Future: the scheduler only ever talks to an executor.

`InProcessExecutor` runs plans on one dedicated worker thread in this process (vLLM's
`UniProcExecutor`): `submit(plan)` returns a `concurrent.futures.Future[CycleResult]` at once,
and plans execute one at a time in submission order. When no plan has arrived for `idle_s`
after the last one, the worker calls `Engine.idle()` once (the engine returns free memory to
the OS then, not between busy cycles). Executors for engines in other processes or machines
can offer the same three methods, since plans and results are plain data.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any

from bios.server.engine.engine import Engine
from bios.server.plan import CyclePlan, CycleResult, SamplePlan, SampleResult

log = logging.getLogger(__name__)

_Plan = CyclePlan | SamplePlan
_STOP = None  # queued by shutdown(): the worker exits after the plans queued before it


class InProcessExecutor:
    """Runs one engine's plans on a single worker thread (the only thread touching it)."""

    def __init__(self, engine: Engine, idle_s: float = 1.0) -> None:
        self._engine = engine
        self._info = engine.info()
        self._idle_s = idle_s
        self._queue: queue.SimpleQueue[tuple[Future[Any], _Plan] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # orders submit() against shutdown()'s stop marker
        self._worker = threading.Thread(target=self._work, name="bios-engine", daemon=True)
        self._worker.start()

    def submit(self, plan: _Plan) -> Future[CycleResult] | Future[SampleResult]:
        """Queue a plan (a training cycle or a sampling chunk); raises RuntimeError after
        `shutdown()`."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit a plan after the executor was shut down")
            self._queue.put((future, plan))
        return future

    def info(self) -> dict[str, Any]:
        """The engine's model facts (`Engine.info()`), read once at construction."""
        return dict(self._info)

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting plans; the queued ones still run. With `wait`, return once they
        have."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        if wait:
            self._worker.join()

    def _work(self) -> None:
        worked = False  # since the last idle call
        while True:
            try:
                item = self._queue.get(timeout=self._idle_s if worked else None)
            except queue.Empty:
                worked = False
                try:
                    self._engine.idle()
                except Exception:  # housekeeping: never let it stop the worker
                    log.exception("engine idle hook failed")
                continue
            if item is _STOP:
                return
            future, plan = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._engine.execute(plan))
            except BaseException as exc:  # the caller sees it through the future
                future.set_exception(exc)
            worked = True
