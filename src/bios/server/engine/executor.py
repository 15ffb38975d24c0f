"""Where an engine runs, hidden behind a Future: the scheduler only ever talks to an executor.

`InProcessExecutor` runs plans on one dedicated worker thread in this process (vLLM's
`UniProcExecutor`): `submit(plan)` returns a `concurrent.futures.Future[CycleResult]` at once,
and plans execute one at a time in submission order. Executors for engines in other processes
or machines can offer the same three methods, since plans and results are plain data.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from bios.server.engine.engine import Engine
from bios.server.plan import CyclePlan, CycleResult, SamplePlan, SampleResult


class InProcessExecutor:
    """Runs one engine's plans on a single worker thread (the only thread touching it)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._info = engine.info()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bios-engine")

    def submit(self, plan: CyclePlan | SamplePlan) -> Future[CycleResult] | Future[SampleResult]:
        """Queue a plan (a training cycle or a sampling chunk); raises RuntimeError after
        `shutdown()`."""
        return self._worker.submit(self._engine.execute, plan)

    def info(self) -> dict[str, Any]:
        """The engine's model facts (`Engine.info()`), read once at construction."""
        return dict(self._info)

    def shutdown(self, wait: bool = True) -> None:
        """Stop accepting plans; with `wait`, finish the queued ones first."""
        self._worker.shutdown(wait=wait)
