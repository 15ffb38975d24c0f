"""The console's server side: read-only history and status routes, and the `/console` page.

- `GET /api/v1/training_runs/{run_id}/history`: a run's requests (kind, status, times,
  cycle, loss), the training cycles it had work in or missed, and its loss per optim step.
  `bios trace` turns it into a Chrome/Perfetto trace; the dashboard draws the loss curve.
- `GET /api/v1/console/status`: per served base model, queued requests, running requests, the
  last cycle and the server's memory now. The dashboard polls it to plot queue depth and
  memory over time (from when the page opened; cycle utilization history comes from
  `/engine/utilization`).
- `GET /console`: the dashboard, a static page (`console/index.html`, `console.js`) with the
  vendored charting library (uPlot, installed by `scripts/setup_console_assets.sh`). It asks
  for the API key in the page and sends it as `X-API-Key` on every call, so it sees only that
  key's runs. The page and its assets need no key (they hold no data).

Queries only: nothing here writes to the store.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import func, select

from bios import types as T
from bios.server.store import (
    COMPLETED,
    QUEUED,
    RUNNING,
    CycleRow,
    RequestRow,
    RunCycleRow,
    Store,
)
from bios.server.validation import APIError

STATIC_DIR = Path(__file__).resolve().parent / "console"
VENDOR_DIR = STATIC_DIR / "vendor"
STATIC_FILES = {  # name -> media type; nothing else is served
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
VENDOR_FILES = {"uPlot.iife.min.js": "text/javascript; charset=utf-8",
                "uPlot.min.css": "text/css; charset=utf-8"}
MAX_HISTORY_REQUESTS = 10_000
_LOSS_RE = re.compile(r'"loss:mean":\s*(-?[0-9][0-9.eE+-]*|NaN|-?Infinity)')


def loss_of(result: str | None) -> float | None:
    """`loss:mean` of a stored forward/forward_backward result (read without parsing the
    whole body, which holds every token's logprob)."""
    if not result:
        return None
    m = _LOSS_RE.search(result)
    if m is None:
        return None
    value = float(m.group(1))
    return value if value == value and abs(value) != float("inf") else None


def run_history(store: Store, run_id: str, after_seq: int, after_cycle: int,
                after_step: int) -> T.RunHistory:
    """A run's requests after `after_seq`, cycles after `after_cycle`, and optim steps after
    step number `after_step` (see T.RunHistory)."""
    with store.tx() as s:
        reqs = s.execute(
            select(RequestRow.seq_id, RequestRow.kind, RequestRow.status, RequestRow.created_at,
                   RequestRow.started_at, RequestRow.completed_at, RequestRow.cycle_id,
                   RequestRow.result, RequestRow.error)
            .where(RequestRow.run_id == run_id)
            .order_by(RequestRow.seq_id)).all()
        cycles = s.execute(
            select(RunCycleRow, CycleRow)
            .join(CycleRow, CycleRow.id == RunCycleRow.cycle_id)
            .where(RunCycleRow.run_id == run_id, RunCycleRow.cycle_id > after_cycle)
            .order_by(RunCycleRow.cycle_id)).all()
    records: list[T.RunRequestRecord] = []
    steps: list[T.StepLoss] = []
    losses: list[float] = []
    for r in reqs:
        loss = None
        if r.kind in ("forward_backward", "forward") and r.status == COMPLETED:
            loss = loss_of(r.result)
            if r.kind == "forward_backward" and loss is not None:
                losses.append(loss)
        if r.kind == "optim_step" and r.status == COMPLETED:
            n = len(steps) + 1
            steps.append(T.StepLoss(step=n, seq_id=r.seq_id, time=r.completed_at or 0.0,
                                    loss=sum(losses) / len(losses) if losses else None))
            losses = []
        if r.seq_id > after_seq and len(records) < MAX_HISTORY_REQUESTS:
            records.append(T.RunRequestRecord(
                seq_id=r.seq_id, kind=r.kind, status=r.status, created_at=r.created_at,
                started_at=r.started_at, completed_at=r.completed_at, cycle_id=r.cycle_id,
                loss=loss, error=r.error))
    return T.RunHistory(
        training_run_id=run_id, requests=records, steps=steps[after_step:],
        cycles=[T.RunCycleRecord(cycle_id=c.id, started_at=c.started_at, engine_ms=c.engine_ms,
                                 total_ms=c.total_ms, runs=c.runs, tokens=c.tokens,
                                 run_tokens=rc.tokens, run_ops=rc.ops,
                                 run_compute_ms=rc.compute_ms, missed=rc.missed)
                for rc, c in cycles])


def _rss_mib() -> float | None:
    """This process's resident set size (Linux /proc; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def server_status(svc: Any) -> T.ServerStatus:
    """Queue depth, running requests, last cycle and memory per served base model."""
    with svc.db.tx() as s:
        rows = s.execute(
            select(RequestRow.base_model, RequestRow.status, RequestRow.kind, func.count())
            .where(RequestRow.status.in_([QUEUED, RUNNING]))
            .group_by(RequestRow.base_model, RequestRow.status, RequestRow.kind)).all()
    counts: dict[str, dict[str, int]] = {}
    for base, status, kind, n in rows:
        c = counts.setdefault(base, {"train": 0, "sample": 0, "running": 0})
        if status == RUNNING:
            c["running"] += int(n)
        else:
            c["sample" if kind == "sample" else "train"] += int(n)
    rss = _rss_mib()
    models = []
    for canonical, served in svc.models.items():
        c = counts.get(canonical, {"train": 0, "sample": 0, "running": 0})
        last = served.clock.last_cycle
        models.append(T.ModelStatus(
            base_model=canonical, queued_training=c["train"], queued_samples=c["sample"],
            running=c["running"], last_cycle_id=last.cycle_id if last else None,
            rss_mib=rss, heap_in_use_mib=last.heap_in_use_mib if last else None))
    return T.ServerStatus(time=time.time(), models=models)


def console_router(svc: Any, owner_of: Any) -> APIRouter:
    """The history and status routes (under /api/v1) and the /console page and assets."""
    r = APIRouter()

    @r.get("/api/v1/training_runs/{run_id}/history")
    def history(request: Request, run_id: str, after_seq: int = Query(-1, ge=-1),
                after_cycle: int = Query(0, ge=0), after_step: int = Query(0, ge=0)
                ) -> T.RunHistory:
        owner = owner_of(request)
        run = svc.db.get_run(run_id)
        if run is None or run.owner != owner:
            raise APIError(404, f"training run {run_id!r} not found", "training_run_id",
                           "unknown_run")
        return run_history(svc.db, run_id, after_seq, after_cycle, after_step)

    @r.get("/api/v1/console/status")
    def status(request: Request) -> T.ServerStatus:
        owner_of(request)  # authenticated like every other query
        return server_status(svc)

    @r.get("/console", include_in_schema=False)
    def page() -> Response:
        return _static(STATIC_DIR, "index.html", STATIC_FILES)

    @r.get("/console/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        return _static(STATIC_DIR, name, STATIC_FILES)

    @r.get("/console/vendor/{name}", include_in_schema=False)
    def vendor(name: str) -> Response:
        if name in VENDOR_FILES and not (VENDOR_DIR / name).is_file():
            raise APIError(404, f"the console's charting library is not installed ({name}); "
                           "run scripts/setup_console_assets.sh (scripts/setup.sh does)", None,
                           "not_installed")
        return _static(VENDOR_DIR, name, VENDOR_FILES)

    return r


def _static(directory: Path, name: str, allowed: dict[str, str]) -> Response:
    """One of the console's own files (a fixed list: no path from the URL reaches the disk)."""
    if name not in allowed:
        raise APIError(404, f"no console file {name!r}", None, "not_found")
    return FileResponse(directory / name, media_type=allowed[name],
                        headers={"Cache-Control": "no-cache"})

