"""Clock cycles: claim queued work, plan it, hand the plan to an engine executor, record results.

No torch here. `build_plan` is a pure function from claimed requests to a `CyclePlan`;
`ClockLoop` is the thread that runs one base model's cycles (vLLM's EngineCore.step loop in
miniature): wait for the tick (fixed period) or for work (continuous), claim, plan, execute,
record, notify waiters, log one line.

Per-run order is the submission order (seq ids). Within a cycle the plan runs in "waves": every
run's leading forward/forward_backward ops share one PassGroup (batched passes across runs),
then every run's next single op (optim_step, save, load, ...) runs, then the next wave. Weights
only change at single ops, so this reordering across runs never changes any run's results.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from bios.server import plan as P
from bios.server.data_paths import resolve, to_stored
from bios.server.store import (
    CheckpointRow,
    ClaimedRequest,
    Outcome,
    Pending,
    RunRecovery,
    RunRow,
    RunWork,
    SamplerRow,
    Store,
)

log = logging.getLogger("bios.scheduler")

PASS_KINDS = ("forward", "forward_backward")
T = TypeVar("T")
# What a store write raises when the database cannot take it now (disk full, I/O error, a
# lost connection): recording results is retried until it succeeds. Anything else is a bug.
STORE_ERRORS = (SQLAlchemyError, OSError)


class Executor(Protocol):
    def submit(self, plan: P.CyclePlan | P.SamplePlan) -> Future[Any]: ...


# ----------------------------------------------------------------------------- planning


def to_op(req: ClaimedRequest, run_spec: P.AdapterSpec | None) -> P.Step:
    """Translate one stored request into a plan op (plain data)."""
    p = req.payload
    wire = p["wire"]
    run_id = req.run_id or ""
    if req.kind == "create":
        assert run_spec is not None
        return P.CreateAdapterOp(req.id, run_id, run_spec, load_from=p.get("load_from"),
                                 load_optimizer=bool(p.get("load_optimizer")))
    if req.kind in PASS_KINDS:
        fb = wire["forward_backward_input" if req.kind == "forward_backward" else "forward_input"]
        data = [
            P.DatumRows(
                tokens=[t for c in d["model_input"]["chunks"] for t in c["tokens"]],
                loss_inputs={k: v["data"] for k, v in d.get("loss_fn_inputs", {}).items()},
            )
            for d in fb["data"]
        ]
        return P.ForwardBackwardOp(req.id, run_id, data, fb["loss_fn"],
                                   dict(fb.get("loss_fn_config") or {}),
                                   forward_only=req.kind == "forward")
    if req.kind == "optim_step":
        return P.OptimStepOp(req.id, run_id, dict(wire.get("adam_params") or {}))
    if req.kind in ("save_weights", "save_weights_for_sampler"):
        ck = p["checkpoint"]
        # The canonical name, so a checkpoint of a run created under an alias loads into any
        # run on the same model (and a PEFT export names the real base model).
        base = p.get("canonical_model", p["base_model_name"])
        return P.SaveStateOp(req.id, run_id, ck["directory"], ck["kind"], base)
    if req.kind == "load_weights":
        return P.LoadStateOp(req.id, run_id, p["directory"], bool(wire.get("optimizer")))
    raise ValueError(f"unknown request kind {req.kind!r}")


def build_plan(cycle_id: int, base_model: str, claimed: list[ClaimedRequest],
               specs: dict[str, P.AdapterSpec]) -> P.CyclePlan:
    """Order claimed requests into waves: batched passes across runs, then single ops."""
    queues: dict[str, list[P.Step]] = {}
    for req in claimed:  # claimed is in (run, seq) order
        queues.setdefault(req.run_id or "", []).append(to_op(req, specs.get(req.run_id or "")))
    return P.CyclePlan(cycle_id, base_model, plan_waves(queues))


def plan_waves(run_ops: dict[str, list[P.Step]]) -> list[P.Step]:
    """Each run's ops (in its order) as waves: every run's leading forward/forward_backward
    ops in one PassGroup, then every run's next single op, then the next wave."""
    queues = {run: deque(ops) for run, ops in run_ops.items()}
    steps: list[P.Step] = []
    while any(queues.values()):
        group: list[P.ForwardBackwardOp] = []
        for q in queues.values():
            while q and isinstance(q[0], P.ForwardBackwardOp):
                group.append(q.popleft())  # type: ignore[arg-type]
        if group:
            steps.append(P.PassGroup(group))
        for q in queues.values():
            if q and not isinstance(q[0], P.ForwardBackwardOp):
                steps.append(q.popleft())
    return steps


# ----------------------------------------------------------------------------- fair share


@dataclass(frozen=True)
class Take:
    """What the fair share gives one run in a cycle: its first `count` items whole, then
    `partial` tokens of the next one (> 0: that item is split, and the run's later items wait
    for its last part)."""

    count: int
    partial: int = 0


@dataclass
class FairShare:
    """The fair-share state that outlives a cycle.

    credit: tenant -> tokens it is owed (> 0) or has taken beyond its share (< 0) over the
    cycles in which it had a backlog (deficit round robin); cleared when its backlog is gone.
    served: tenant or run -> the pick counter when it was last given work (round-robin ties).
    """

    credit: dict[str, float] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    picks: int = 0


def select_fair(queues: dict[str, list[Pending]], owners: dict[str, str], budget: int,
                split_tokens: int, fair: FairShare,
                heads: dict[str, tuple[int, int]] | None = None) -> dict[str, Take]:
    """Share one cycle's pass-token `budget` fairly between tenants, then between each
    tenant's runs, keeping each run's order. Pure apart from updating `fair`.

    queues: run -> its runnable requests in seq order; owners: run -> tenant. heads: run ->
    (tokens left, tokens of the next datum) of its split request in progress, which comes
    before its queue (item 0).
    Each pick goes to the tenant with the least tokens this cycle net of its credit, and
    within it to the run with the least tokens this cycle (ties: the least recently served),
    which takes its next item if it fits what is left of the budget. An item of more than
    `split_tokens` tokens (one pass) that does not fit is split: the run
    gets what is left, if that holds its next datum (a part is whole datums, at least one);
    else it waits for a cycle where it does, or where it is the first pick. Non-pass ops
    (0 tokens: optim_step, save, load, create) cost nothing and are taken whenever they reach
    a run's head, so the token accounting never starves them. If nothing fits at all, the
    first pick is taken whole anyway, so every cycle makes progress.
    """
    heads = heads or {}
    items: dict[str, list[int]] = {}
    min_part: dict[str, list[int]] = {}  # the smallest part each item splits into
    for run in sorted(set(queues) | set(heads)):
        head = [heads[run]] if run in heads else []
        items[run] = [t for t, _ in head] + [p.tokens for p in queues.get(run, [])]
        min_part[run] = [d for _, d in head] + [p.datum_tokens for p in queues.get(run, [])]
    pos = dict.fromkeys(items, 0)
    partial: dict[str, int] = {}
    blocked: set[str] = set()
    taken_t: dict[str, int] = {}
    taken_r: dict[str, int] = {}
    left = budget
    tokens_taken = 0
    # Only an item bigger than a pass is split. One that fits a pass but not a time-bounded
    # budget runs whole as a cycle's first pick: cut in two, it cost a second pass's fixed
    # work (the demo on SmolLM2, 674-token steps in 620 + 54-token parts: 0.38 against 0.51
    # steps/s unbounded), and it keeps a cycle's length within one pass.
    split_over = split_tokens

    def absorb(run: str) -> None:  # free items at the head, except a split in progress
        while pos[run] < len(items[run]) and items[run][pos[run]] == 0 and not (
                pos[run] == 0 and run in heads):
            pos[run] += 1

    for run in items:
        absorb(run)
    tenants_at_start = {owners.get(r, "") for r in items}

    def key(r: str) -> tuple[float, int, int, int, str]:
        t = owners.get(r, "")
        return (taken_t.get(t, 0) - fair.credit.get(t, 0.0), fair.served.get("tenant:" + t, -1),
                taken_r.get(r, 0), fair.served.get(r, -1), r)

    while left > 0:
        cands = [r for r in items if r not in blocked and pos[r] < len(items[r])]
        if not cands:
            break
        run = min(cands, key=key)
        tenant = owners.get(run, "")
        fair.picks += 1
        fair.served["tenant:" + tenant] = fair.served[run] = fair.picks
        cost = items[run][pos[run]]
        if cost <= left or (tokens_taken == 0 and cost <= split_over):
            got = cost
            pos[run] += 1
            absorb(run)
        elif cost > split_over and (min_part[run][pos[run]] <= left or tokens_taken == 0):
            got = left
            partial[run] = left
            blocked.add(run)
        else:
            blocked.add(run)  # waits for the next cycle; a smaller item may still fit
            continue
        taken_t[tenant] = taken_t.get(tenant, 0) + got
        taken_r[run] = taken_r.get(run, 0) + got
        left -= got
        tokens_taken += got
    # Deficit round robin across cycles: a tenant still backlogged keeps what it was owed
    # (its even share of the budget minus what it took), bounded by one cycle's budget.
    share = budget / max(1, len(tenants_at_start))
    backlogged = {owners.get(r, "") for r in items if pos[r] < len(items[r]) or r in partial}
    for t in tenants_at_start:
        if t in backlogged:
            c = fair.credit.get(t, 0.0) + share - taken_t.get(t, 0)
            fair.credit[t] = max(-float(budget), min(float(budget), c))
        else:
            fair.credit.pop(t, None)
    for t in list(fair.credit):
        if t not in tenants_at_start:
            del fair.credit[t]
    return {r: Take(pos[r], partial.get(r, 0)) for r in items if pos[r] or r in partial}


@dataclass
class SplitRequest:
    """A forward/forward_backward request run in parts (its datums in order, a part per
    cycle), with the parts' outputs gathered until the last one ran. Gradients accumulate in
    the run as for consecutive requests; the assembled result is the one-pass result."""

    request: ClaimedRequest
    op: P.ForwardBackwardOp
    next_datum: int = 0
    parts: int = 0
    outputs: list[Any] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_tokens: int = 0
    template: dict[str, Any] = field(default_factory=dict)  # the first part's other fields

    @property
    def remaining_tokens(self) -> int:
        return sum(len(d.tokens) for d in self.op.data[self.next_datum:])

    @property
    def next_datum_tokens(self) -> int:
        return len(self.op.data[self.next_datum].tokens) if not self.done else 0

    @property
    def done(self) -> bool:
        return self.next_datum >= len(self.op.data)

    def part(self, allowance: int | None) -> P.ForwardBackwardOp:
        """The next part: datums while they fit `allowance` tokens (None: all the rest), at
        least one. Its request id is the request's with `#part<N>`."""
        end, used = self.next_datum, 0
        while end < len(self.op.data) and (allowance is None or end == self.next_datum
                                           or used + len(self.op.data[end].tokens) <= allowance):
            used += len(self.op.data[end].tokens)
            end += 1
        part = P.ForwardBackwardOp(f"{self.request.id}#part{self.parts}", self.op.run_id,
                                   self.op.data[self.next_datum:end], self.op.loss_fn,
                                   self.op.loss_config, forward_only=self.op.forward_only)
        self.next_datum = end
        self.parts += 1
        return part

    def add(self, result: P.OpResult) -> None:
        """Gather a successful part's outputs (per datum, in order) and loss sums."""
        body = result.result or {}
        if not self.template:
            self.template = {k: v for k, v in body.items() if k != "loss_fn_outputs"}
        self.outputs.extend(body.get("loss_fn_outputs", []))
        self.loss_sum += float(body.get("metrics", {}).get("loss:sum", 0.0))
        self.loss_tokens += result.loss_tokens

    def result(self) -> dict[str, Any]:
        """The whole request's ForwardBackwardOutput, as the engine gives for one pass: the
        parts' per-datum outputs in order, loss:sum summed, loss:mean over all its tokens."""
        metrics = {**self.template.get("metrics", {}), "loss:sum": self.loss_sum,
                   "loss:mean": self.loss_sum / self.loss_tokens if self.loss_tokens else 0.0}
        return {**self.template, "loss_fn_outputs": self.outputs, "metrics": metrics}


def run_work(plan: P.CyclePlan, stats: P.CycleStats) -> dict[str, RunWork]:
    """Each run's part in a cycle: its ops (from the plan), tokens and engine time (from the
    engine's per-run stats; without them, the plan's tokens and engine_ms split by tokens,
    or by ops when the cycle had no tokens)."""
    ops: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for step in plan.steps:
        for op in step.ops if isinstance(step, P.PassGroup) else [step]:
            ops[op.run_id] = ops.get(op.run_id, 0) + 1
            if isinstance(op, P.ForwardBackwardOp):
                tokens[op.run_id] = tokens.get(op.run_id, 0) + op.num_tokens
    if stats.tokens_by_run or stats.compute_ms_by_run:
        tokens = dict(stats.tokens_by_run)
        compute = dict(stats.compute_ms_by_run)
    else:
        total_tokens, total_ops = sum(tokens.values()), sum(ops.values())
        compute = {r: stats.engine_ms * (tokens.get(r, 0) / total_tokens if total_tokens
                                         else n / total_ops)
                   for r, n in ops.items()}
    return {r: RunWork(tokens=tokens.get(r, 0), ops=n, compute_ms=compute.get(r, 0.0))
            for r, n in ops.items()}


def directory_bytes(path: str | Path) -> int:
    """The bytes of the files under a directory (a checkpoint's size; 0 if it is gone)."""
    try:
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    except OSError:
        return 0


def spec_of(run: RunRow) -> P.AdapterSpec:
    return P.AdapterSpec(rank=run.rank, seed=run.seed, alpha=run.alpha, train_attn=run.train_attn,
                         train_mlp=run.train_mlp, train_unembed=run.train_unembed)


# ----------------------------------------------------------------------------- the loop


@dataclass
class _Unsaved:
    """A run's state changes since its last snapshot (for the snapshot policy)."""

    since: float  # time of the first change not in a snapshot
    steps: int = 0  # optim_steps not in a snapshot
    force: bool = False  # a load_weights is not in a snapshot: snapshot at the next chance

    def due(self, now: float, every_steps: int, every_s: float) -> bool:
        return (self.force or (every_steps > 0 and self.steps >= every_steps)
                or (every_s > 0 and now - self.since >= every_s))


@dataclass
class CycleLog:
    cycle_id: int
    base_model: str
    runs: int
    ops: int
    tokens: int
    passes: int
    engine_ms: float
    total_ms: float
    ops_by_kind: dict[str, int]
    rss_mib: float | None = None  # the engine process's resident size at the cycle's end
    heap_in_use_mib: float | None = None
    split: int = 0  # split requests still in progress after the cycle

    def line(self) -> str:
        kinds = ",".join(f"{k}:{v}" for k, v in sorted(self.ops_by_kind.items()))
        mem = "".join(f" {name}={value:.0f}" for name, value in
                      (("rss_mib", self.rss_mib), ("heap_mib", self.heap_in_use_mib))
                      if value is not None)
        return (f"cycle {self.cycle_id} model={self.base_model} runs={self.runs} "
                f"ops={self.ops} [{kinds}] tokens={self.tokens} passes={self.passes} "
                f"engine_ms={self.engine_ms:.1f} total_ms={self.total_ms:.1f}{mem}"
                + (f" split={self.split}" if self.split else ""))


class ClockLoop:
    """Runs the clock cycles of one base model in a dedicated thread.

    period > 0: a cycle starts every `period` seconds (a cycle that overruns makes the next
    start at once); requests stored after a cycle's start wait for the next cycle.
    period == 0: continuous; a cycle starts as soon as work is queued and the engine is free.
    """

    def __init__(self, *, base_model: str, store: Store, executor: Executor, period: float,
                 notify: Callable[[dict[str, str | None]], None], cycle_ids: Callable[[], int],
                 state_dir: str | Path | None = None, snapshot_steps: int = 50,
                 snapshot_seconds: float = 120.0,
                 unload_idle_s: float = 0.0, data_dir: str | Path | None = None,
                 cycle_tokens: int = 0, cycle_seconds: float = 0.0, split_tokens: int = 2048,
                 max_resident_runs: int = 0, max_resident_runs_per_tenant: int = 0,
                 model_dims: P.ModelDims | None = None, max_resident_bytes: int = 0,
                 max_resident_bytes_per_tenant: int = 0,
                 on_sample_progress: Callable[[dict[str, list[list[int]]]], None] | None = None):
        self.base_model = base_model
        self.store = store
        self.executor = executor
        self.period = period
        self.notify = notify
        self._cycle_ids = cycle_ids
        self._wake = threading.Event()
        self._sampling_active = 0  # sample requests still decoding in the engine
        self.max_admit = 64  # sample requests admitted per chunk
        self.decode_chunk = 16  # decode steps between chances to run a training cycle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"clock[{base_model}]",
                                        daemon=True)
        self.last_cycle: CycleLog | None = None
        # Crash recovery: periodic snapshots of each run's state (None: no snapshots).
        self.state_dir = Path(state_dir) if state_dir is not None else None
        # Stored directories are relative to the data dir (data_paths.py); None: as given.
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.snapshot_steps = snapshot_steps
        self.snapshot_seconds = snapshot_seconds
        self._unsaved: dict[str, _Unsaved] = {}  # runs whose state changed since a snapshot
        # Residency: runs whose state is in the engine. A run idle for unload_idle_s (> 0,
        # with snapshots on) is released after a snapshot and rebuilt on its next request.
        self.unload_idle_s = unload_idle_s
        self._resident: set[str] = set()
        self._last_active: dict[str, float] = {}  # run -> monotonic time of its last claim
        self._dirty: set[str] = set()  # runs holding gradients no optim_step has consumed
        self._last_unload_check = 0.0
        # Streaming: the tokens so far of streamed samples go to on_sample_progress after
        # every chunk; cancelled sample requests (id -> when) are dropped at the next chunk.
        self.on_sample_progress = on_sample_progress
        self._sample_cancels: dict[str, float] = {}
        self._cancel_lock = threading.Lock()
        # At most this many runs (all tenants; per tenant) stay resident: before a cycle
        # needs more, the least recently used idle runs are unloaded as idle ones are.
        self.max_resident_runs = max_resident_runs
        self.max_resident_runs_per_tenant = max_resident_runs_per_tenant
        self._owner: dict[str, str] = {}  # run -> tenant, for runs the clock has seen
        # And at most this many bytes of runs' adapter weights + AdamW state (0: no bound),
        # computed from each run's AdapterSpec and the model's dims (None: no bytes bound).
        self.model_dims = model_dims
        self.max_resident_bytes = max_resident_bytes
        self.max_resident_bytes_per_tenant = max_resident_bytes_per_tenant
        self._run_bytes: dict[str, int] = {}  # run -> its resident bytes (specs never change)
        # The cycle bound (0: none, every runnable request in one cycle): pass tokens per
        # cycle, and a target engine time per cycle, turned into tokens with the measured
        # throughput. Work past it carries over; requests over split_tokens are split.
        self.cycle_tokens = cycle_tokens
        self.cycle_seconds = cycle_seconds
        self.split_tokens = max(1, split_tokens)
        # The time bound never makes a cycle smaller than a quarter of a pass: smaller ones
        # would chop requests into many cycles for little gain in latency.
        self.min_cycle_tokens = max(64, self.split_tokens // 4)
        self.fair = FairShare()
        self._splits: dict[str, SplitRequest] = {}  # run -> its split request in progress
        self._tokens_per_s: float | None = None  # engine pass throughput (moving average)
        self._overhead_s: float | None = None  # a cycle's time outside the engine (average)
        # Runs a restart still has to rebuild (recover(background=True)), in order: the
        # clock rebuilds one between cycles, or a run at once when work of it is claimed.
        self._pending_restore: dict[str, RunRecovery] = {}
        # Recording a cycle's results that the store refused is retried after this many
        # seconds, doubling up to the max (see _until_stored).
        self.record_retry_s = 0.05
        self.record_retry_max_s = 5.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the clock after its current cycle, then snapshot the runs with unsaved
        changes (a clean shutdown, SIGTERM: the next start replays nothing for them)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._thread.is_alive():
            log.warning("clock of %s did not stop in 30 s; no shutdown snapshots",
                        self.base_model)
            return
        try:
            self.snapshot_unsaved_runs()
        except Exception:
            log.exception("shutdown snapshots of %s failed", self.base_model)

    def snapshot_unsaved_runs(self) -> list[str]:
        """Snapshot every resident run whose state changed since its last snapshot and that
        holds no pending gradients (those replay from their last snapshot). Call only while
        no cycle runs (the clock is stopped). Returns the runs snapshotted."""
        if self.state_dir is None:
            return []
        due = {}
        for run in sorted(self._unsaved):
            if run in self._resident and run not in self._dirty:
                row = self.store.get_run(run)
                if row is not None and not row.lost_reason:
                    due[run] = row.next_seq - 1  # every claimed request has finished
        if due:
            self._write_snapshots(0, due)
        return [run for run in due if run not in self._unsaved]

    def wake(self) -> None:
        """Called after a submit: in continuous mode, start a cycle now if idle."""
        self._wake.set()

    def cancel_sample(self, request_id: str) -> None:
        """Stop generating for a sample request (from any thread): it fails as cancelled at
        the next decode chunk. A cancel waits up to a minute for a request not yet admitted."""
        with self._cancel_lock:
            self._sample_cancels[request_id] = time.monotonic()
        self._wake.set()

    def _pending_cancels(self) -> tuple[str, ...]:
        with self._cancel_lock:
            now = time.monotonic()
            for rid in [r for r, t in self._sample_cancels.items() if now - t > 60.0]:
                del self._sample_cancels[rid]
            return tuple(self._sample_cancels)

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            trained = sampled = False
            try:
                if self._pending_restore:
                    self._restore_next_pending()
                now = time.monotonic()
                if self.period == 0 or now >= next_tick:
                    if self.period > 0:
                        next_tick = max(next_tick + self.period, now)
                    trained = self.run_cycle() is not None
                sampled = self.run_sampling_chunk()
            except Exception:  # a bug here must not kill the clock; requests fail visibly
                log.exception("cycle failed for %s", self.base_model)
            if time.monotonic() - self._last_unload_check >= 1.0:
                self._last_unload_check = time.monotonic()
                try:
                    self.unload_idle_runs()
                except Exception:
                    log.exception("unloading idle runs of %s failed", self.base_model)
            if not (trained or sampled):
                timeout = next_tick - time.monotonic() if self.period > 0 else 1.0
                self._wake.wait(timeout=max(0.0, timeout))
                self._wake.clear()

    def run_sampling_chunk(self) -> bool:
        """Admit queued sample requests and run a bounded chunk of decode steps.

        Training cycles run between chunks, so a stream of samples never starves training
        and a training cycle never waits for a long generation to finish.
        """
        if self._sampling_active == 0 and not self.store.has_queued_samples(self.base_model):
            return False
        claimed = self.store.claim_samples(self.base_model, limit=self.max_admit)
        admit = [P.SampleOp(request_id=r.id, **r.payload["sample_op"]) for r in claimed]
        sample_plan = P.SamplePlan(admit=admit, max_decode_steps=self.decode_chunk,
                                   cancel=self._pending_cancels())
        try:
            res: P.SampleResult = self.executor.submit(sample_plan).result()  # type: ignore[arg-type]
        except Exception as e:
            log.exception("sampler failed")
            res = P.SampleResult([P.OpResult(r.id, ok=False, error=f"sampler error: {e}")
                                  for r in claimed], active=0)
        finished = [Outcome(op.request_id, result=op.result or {}) if op.ok
                    else Outcome(op.request_id, error=op.error or "failed", category=op.category)
                    for op in res.finished]
        # One transaction for the chunk, as for a cycle; kept and retried on a store error.
        bodies = self._until_stored("sample results", lambda: self.store.finish_many(finished))
        self._sampling_active = res.active
        if sample_plan.cancel:
            with self._cancel_lock:
                for op in res.finished:
                    self._sample_cancels.pop(op.request_id, None)
        if res.partial and self.on_sample_progress is not None:
            self.on_sample_progress(res.partial)
        if bodies:
            self.notify(bodies)
        return True

    def cycle_budget(self) -> int:
        """This cycle's pass-token bound (0: none): `cycle_tokens`, lowered to what the
        engine runs in the cycle's target time at its measured throughput. The target time is
        `cycle_seconds`, raised where needed to keep the clock's own work per cycle (claim,
        record, notify: measured) under a tenth of a cycle, so that bounded cycles cost the
        engine's throughput little on any machine."""
        if self.cycle_tokens <= 0:
            return 0
        budget = self.cycle_tokens
        if self.cycle_seconds > 0 and not self._tokens_per_s:
            return min(budget, self.split_tokens)  # one pass until the throughput is known
        if self.cycle_seconds > 0 and self._tokens_per_s:
            target = max(self.cycle_seconds, 9 * (self._overhead_s or 0.0))
            budget = min(budget, max(self.min_cycle_tokens,
                                     int(self._tokens_per_s * target)))
        return budget

    def _choose(self, budget: int, parts: dict[str, int | None]
                ) -> Callable[[dict[str, list[Pending]]], dict[str, int]]:
        """The store's selector for this cycle: fair shares of `budget` (see select_fair).
        Fills `parts` with run -> token allowance (None: the rest) of the split request it
        continues or starts."""
        def choose(queues: dict[str, list[Pending]]) -> dict[str, int]:
            for run, rows in queues.items():
                self._owner[run] = rows[0].owner
            if budget <= 0:
                return {run: len(rows) for run, rows in queues.items()}
            heads = {run: (sp.remaining_tokens, sp.next_datum_tokens)
                     for run, sp in self._splits.items()}
            takes = select_fair(queues, self._owner, budget, self.split_tokens, self.fair,
                                heads)
            claim: dict[str, int] = {}
            for run, take in takes.items():
                if run in heads:  # item 0 is the split in progress, not a queued request
                    if take.count:
                        parts[run] = None
                    elif take.partial:
                        parts[run] = take.partial
                    claim[run] = max(0, take.count - 1)
                else:
                    claim[run] = take.count + (1 if take.partial else 0)
                    if take.partial:
                        parts[run] = take.partial
            return claim
        return choose

    def run_cycle(self) -> CycleLog | None:
        """Claim what is runnable now (within the cycle bound, shared fairly), execute it as
        one cycle, record the outcome. Work past the bound stays queued for the next cycle."""
        started = time.time()
        c0 = time.perf_counter()
        parts: dict[str, int | None] = {}  # run -> allowance of its split part this cycle
        claimed = self.store.claim_cycle(self.base_model, cutoff=started,
                                         choose=self._choose(self.cycle_budget(), parts))
        if claimed:
            self._make_room({r.run_id for r in claimed if r.run_id} | set(parts))
            claimed = self._restore_claimed(claimed)
        continuing = {run: a for run, a in parts.items() if run in self._splits}
        if not claimed and not continuing:
            return None
        t0 = time.perf_counter()
        specs = self._specs_for(claimed)
        cycle_id = self._cycle_ids()
        run_ops: dict[str, list[P.Step]] = {}
        part_of: dict[str, SplitRequest] = {}  # part request id -> its split request
        for run, allowance in continuing.items():
            part = self._splits[run].part(allowance)
            part_of[part.request_id] = self._splits[run]
            run_ops[run] = [part]
        last = {r.run_id: r.id for r in claimed}  # each run's last claimed request
        for req in claimed:
            run = req.run_id or ""
            op = to_op(req, specs.get(run))
            if run in parts and run not in continuing and last[run] == req.id:
                assert isinstance(op, P.ForwardBackwardOp)
                split = self._splits[run] = SplitRequest(req, op)
                op = split.part(parts[run])
                part_of[op.request_id] = split
            run_ops.setdefault(run, []).append(op)
        plan = P.CyclePlan(cycle_id, self.base_model, plan_waves(run_ops))
        by_id = {r.id: r for r in claimed}
        try:
            result = self.executor.submit(plan).result()
        except Exception as e:  # the engine itself broke: fail this cycle's requests
            log.exception("engine failed on cycle %d", cycle_id)
            result = P.CycleResult(cycle_id, [
                P.OpResult(op.request_id, ok=False, error=f"engine error: {e}",
                           category="server")
                for step in plan.steps
                for op in (step.ops if isinstance(step, P.PassGroup) else [step])])
        outcomes: list[Outcome] = []
        for op in result.results:
            split = part_of.get(op.request_id)
            if split is not None:
                run = split.op.run_id
                if not op.ok:  # the request fails as a whole; its later parts never run
                    self._splits.pop(run, None)
                    outcomes.append(Outcome(split.request.id, error=op.error or "failed",
                                            category=op.category))
                    continue
                split.add(op)
                if split.done:
                    self._splits.pop(run, None)
                    outcomes.append(Outcome(split.request.id, result=split.result()))
                continue
            req = by_id.get(op.request_id)
            if req is None:
                continue
            if op.ok:
                if req.kind == "create" and req.run_id:
                    self._resident.add(req.run_id)
                outcomes.append(Outcome(req.id, result=self._wire_result(req, op.result or {})))
            else:
                outcomes.append(Outcome(req.id, error=op.error or "failed",
                                        category=op.category))
        done = {o.request_id for o in outcomes}
        in_progress = {sp.request.id for sp in self._splits.values()}
        stuck = [r for r in claimed if r.id not in done and r.id not in in_progress]
        answered = {r.request_id for r in result.results}
        stuck += [sp.request for part_id, sp in part_of.items() if sp.request.id not in done
                  and part_id not in answered]
        for req in stuck:  # never leave one hanging
            if req.run_id and self._splits.get(req.run_id) is not None \
                    and self._splits[req.run_id].request.id == req.id:
                del self._splits[req.run_id]
            outcomes.append(Outcome(req.id, error="the engine returned no result for this "
                                    "request", category="server"))
        bodies = self._until_stored(  # one transaction; kept and retried on a store error
            f"the results of cycle {cycle_id}",
            lambda: self.store.finish_many(outcomes, cycle_id=cycle_id))
        ended = time.time()  # requests after this are the clients' answers, not misses
        self.notify(bodies)  # clients first, bookkeeping after
        active = time.monotonic()
        for run in run_ops:
            if run:
                self._last_active[run] = active
        total_ms = (time.perf_counter() - t0) * 1000
        st = result.stats
        if st.tokens >= min(self.min_cycle_tokens, self.split_tokens) and st.engine_ms > 0:
            rate = st.tokens / (st.engine_ms / 1000)
            overhead = max(0.0, time.perf_counter() - c0 - st.engine_ms / 1000)
            self._tokens_per_s = rate if self._tokens_per_s is None else (
                0.7 * self._tokens_per_s + 0.3 * rate)
            self._overhead_s = overhead if self._overhead_s is None else (
                0.7 * self._overhead_s + 0.3 * overhead)
        try:  # statistics only: a store error here loses this cycle's row, nothing else
            self.store.record_cycle(self.base_model, started, st.engine_ms, total_ms, st.runs,
                                    plan.num_ops, st.tokens, st.passes, cycle_id=cycle_id,
                                    run_work=run_work(plan, st), ended_at=ended)
        except STORE_ERRORS as e:
            log.warning("cycle %d of %s: its statistics row was not stored (%s: %s)",
                        cycle_id, self.base_model, type(e).__name__, e)
        entry = CycleLog(cycle_id, self.base_model, st.runs, plan.num_ops, st.tokens, st.passes,
                         st.engine_ms, total_ms, dict(st.ops_by_kind), st.rss_mib,
                         st.heap_in_use_mib, split=len(self._splits))
        self.last_cycle = entry
        log.info(entry.line())
        finished = [r for r in claimed if r.id not in in_progress]
        self._snapshot_due_runs(plan, result, finished)
        return entry

    def _until_stored(self, what: str, write: Callable[[], T]) -> T:
        """Run a store write of finished work until the store accepts it.

        The engine work is done and its results are in memory: a store error (disk full, say)
        must neither lose them nor leave their requests `running` with futures that never
        resolve. So retry with backoff (`record_retry_s` doubling up to `record_retry_max_s`),
        logging once when the failure starts and once when it ends. Only this model's clock
        waits; other models' clocks, /healthz and reads go on. A stop request ends the wait
        (the requests stay `running`; the next start queues them again)."""
        delay = self.record_retry_s
        failing_since: float | None = None
        tries = 0
        while True:
            try:
                out = write()
            except STORE_ERRORS as e:
                tries += 1
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.error("recording %s of %s failed (%s: %s); the results are kept and "
                              "recording is retried until the store accepts them", what,
                              self.base_model, type(e).__name__, e)
                if self._stop.wait(delay):
                    raise
                delay = min(2 * delay, self.record_retry_max_s)
                continue
            if failing_since is not None:
                log.warning("recorded %s of %s after %.1f s of store errors (%d failed tries)",
                            what, self.base_model, time.monotonic() - failing_since, tries)
            return out

    def _specs_for(self, claimed: list[ClaimedRequest]) -> dict[str, P.AdapterSpec]:
        specs: dict[str, P.AdapterSpec] = {}
        for req in claimed:
            if req.kind == "create" and req.run_id:
                run = self.store.get_run(req.run_id)
                assert run is not None
                specs[req.run_id] = spec_of(run)
        return specs

    # ------------------------------------------------------------------ crash recovery

    def _snapshot_due_runs(self, plan: P.CyclePlan, result: P.CycleResult,
                           claimed: list[ClaimedRequest]) -> None:
        """After a cycle: snapshot the runs whose state changed and whose last snapshot is
        `snapshot_steps` optim steps or `snapshot_seconds` old (at once after a load_weights).

        Only when the run's last state-changing op of the cycle was a successful optim_step or
        load (its gradients are zero: a snapshot holds weights and AdamW state, not pending
        gradients). The snapshot contains the effects of every request up to the run's last
        claimed seq of this cycle, which the store records as snapshot_seq.
        """
        if self.state_dir is None:
            return
        ok = {r.request_id: r.ok for r in result.results}
        now = time.time()
        clean: dict[str, bool] = {}  # run -> its last state-changing op left no gradients
        for step in plan.steps:
            for op in step.ops if isinstance(step, P.PassGroup) else [step]:
                good = ok.get(op.request_id, False)
                if isinstance(op, P.ForwardBackwardOp):
                    if op.forward_only or not good:
                        continue  # no effect on the run's state
                    clean[op.run_id] = False
                elif isinstance(op, P.OptimStepOp):
                    clean[op.run_id] = good  # a failed step may or may not have zeroed grads
                    if not good:
                        continue
                elif isinstance(op, P.LoadStateOp) or (isinstance(op, P.CreateAdapterOp)
                                                         and op.load_from is not None):
                    if not good:
                        continue  # a load validates everything before it changes anything
                    clean[op.run_id] = True
                else:
                    continue
                u = self._unsaved.setdefault(op.run_id, _Unsaved(since=now))
                u.steps += isinstance(op, P.OptimStepOp)
                # A load (or a creation from a checkpoint) is snapshotted at once: replaying
                # the log after a crash recreates runs fresh, without the loaded weights.
                u.force = u.force or isinstance(op, P.LoadStateOp | P.CreateAdapterOp)
        for run, c in clean.items():  # a run holding gradients cannot be unloaded
            (self._dirty.discard if c else self._dirty.add)(run)
        last_seq: dict[str, int] = {}
        for req in claimed:
            if req.run_id and req.seq_id is not None:
                last_seq[req.run_id] = max(last_seq.get(req.run_id, 0), req.seq_id)
        due = {run: last_seq[run] for run, c in clean.items()
               if c and run in last_seq and self._unsaved[run].due(
                   now, self.snapshot_steps, self.snapshot_seconds)}
        if due:
            self._write_snapshots(plan.cycle_id, due)

    def _write_snapshots(self, cycle_id: int, due: dict[str, int]) -> None:
        """Save each run's training state (weights + AdamW) under state_dir/<run>/, record it
        in the store, then delete the run's older snapshots (and any crashed partial write)."""
        assert self.state_dir is not None
        dirs = {run: self.state_dir / run.replace(":", "__")
                / f"seq-{seq:010d}-{uuid.uuid4().hex[:8]}" for run, seq in due.items()}
        ops: list[P.Step] = [P.SaveStateOp(f"snapshot:{run}:{seq}", run, str(dirs[run]),
                                           "training", self.base_model)
                             for run, seq in due.items()]
        t0 = time.perf_counter()
        try:
            res: P.CycleResult = self.executor.submit(  # type: ignore[assignment]
                P.CyclePlan(cycle_id, self.base_model, ops)).result()
        except Exception:
            log.exception("snapshots failed for %s", self.base_model)
            return
        saved = 0
        for op, r in zip(ops, res.results, strict=False):
            assert isinstance(op, P.SaveStateOp)
            if not r.ok:
                log.warning("snapshot of run %s failed: %s", op.run_id, r.error)
                continue
            stored = (to_stored(self.data_dir, op.directory) if self.data_dir is not None
                      else op.directory)
            self.store.set_snapshot(op.run_id, stored, due[op.run_id])
            self._unsaved.pop(op.run_id, None)
            saved += 1
            keep = Path(op.directory)
            for old in keep.parent.iterdir():
                if old != keep:
                    shutil.rmtree(old, ignore_errors=True)
        log.info("snapshots model=%s runs=%d ms=%.1f", self.base_model, saved,
                 (time.perf_counter() - t0) * 1000)

    def recover(self, background: bool = False) -> list[str]:
        """Rebuild engine state from the durable log after a restart; call before `start()`.

        Requests that were running are queued again (Store.prepare_recovery), so each
        optim_step applies exactly once. Runs with queued work or a request within the last
        `unload_idle_s` are rebuilt (see `_restore`); the others stay on disk and are
        rebuilt when work arrives for them, so start-up time does not grow with history.

        background=False rebuilds them now and returns their ids. background=True only
        records them and returns their ids: the clock rebuilds them one at a time between
        cycles once started (a run at once when work of it is claimed), so the server
        answers (healthz, other runs' requests) while a long replay is under way.
        Logs one line per run.
        """
        t0 = time.perf_counter()
        since = time.time() - self.unload_idle_s if self.unload_idle_s > 0 else None
        recs = self.store.prepare_recovery(self.base_model, active_since=since)
        if background:
            self._pending_restore = {rec.run.id: rec for rec in recs}
            if recs:
                log.info("recovery model=%s runs=%d: rebuilding in the background",
                         self.base_model, len(recs))
            return list(self._pending_restore)
        recovered = self._restore(recs, "recovered")
        if recs:
            log.info("recovery model=%s runs=%d lost=%d ms=%.1f", self.base_model,
                     len(recovered), len(recs) - len(recovered),
                     (time.perf_counter() - t0) * 1000)
        return recovered

    def _restore(self, recs: list[RunRecovery], verb: str) -> list[str]:
        """Rebuild runs in the engine from their log: per run, create its adapter (same spec
        and seed), load its last snapshot with optimizer state if it has one, then replay its
        completed state-changing requests after the snapshot in seq order: one batched plan
        through the normal engine, results discarded (they were recorded when first run). A
        run whose rebuild fails is marked lost and its pending requests fail. Returns the runs
        rebuilt."""
        claimed: list[ClaimedRequest] = []
        specs: dict[str, P.AdapterSpec] = {}
        lost: dict[str, str] = {}
        for rec in recs:
            run_id = rec.run.id
            specs[run_id] = spec_of(rec.run)
            mine = [ClaimedRequest(f"recover:{run_id}:create", run_id, 0, "create", {"wire": {}})]
            if rec.snapshot_dir:
                mine.append(ClaimedRequest(
                    f"recover:{run_id}:snapshot", run_id, rec.snapshot_seq, "load_weights",
                    {"wire": {"optimizer": True}, "directory": rec.snapshot_dir}))
            mine.extend(rec.replay)
            try:
                for req in mine:
                    to_op(req, specs[run_id])
            except Exception as e:  # a stored payload the planner cannot read
                lost[run_id] = f"cannot replay its request log: {type(e).__name__}: {e}"
                continue
            claimed.extend(mine)
        owner = {r.id: r.run_id or "" for r in claimed}
        results: list[P.OpResult] = []
        stats = P.CycleStats()
        if claimed:
            plan = build_plan(0, self.base_model, claimed, specs)
            try:
                res: P.CycleResult = self.executor.submit(plan).result()  # type: ignore[assignment]
                results, stats = res.results, res.stats
            except Exception as e:
                log.exception("rebuilding runs of %s failed", self.base_model)
                results = [P.OpResult(r.id, ok=False, error=f"engine error: {e}")
                           for r in claimed]
        for r in results:
            if not r.ok and owner.get(r.request_id) and owner[r.request_id] not in lost:
                lost[owner[r.request_id]] = f"replaying {r.request_id} failed: {r.error}"
        if lost:
            try:
                self.executor.submit(P.CyclePlan(0, self.base_model, [
                    P.ReleaseAdapterOp(f"recover:{run}:release", run) for run in lost])).result()
            except Exception:
                log.exception("releasing unrecoverable runs failed")
        now = time.time()
        restored: list[str] = []
        for rec in recs:
            run_id = rec.run.id
            if run_id in lost:
                when = ("the server restarted and" if verb == "recovered"
                        else "the run was unloaded while idle and")
                reason = (f"{when} this run's state could not be rebuilt ({lost[run_id]}); "
                          "resume it with create_training_client_from_state"
                          "(<a saved checkpoint>)")
                failed = self.store.mark_run_lost(run_id, reason)
                log.error("run %s lost: %s (%d pending requests failed)", run_id,
                          lost[run_id], failed)
                continue
            restored.append(run_id)
            self._resident.add(run_id)
            self._owner[run_id] = rec.run.owner
            self._last_active[run_id] = time.monotonic()
            kinds = {k: sum(1 for q in rec.replay if q.kind == k)
                     for k in ("forward_backward", "optim_step", "load_weights")}
            if rec.replay:
                u = self._unsaved.setdefault(run_id, _Unsaved(since=now))
                u.steps += kinds["optim_step"]
                u.force = u.force or kinds["load_weights"] > 0
            log.info("%s run %s: %s + replayed %d ops (fb=%d optim=%d load=%d) "
                     "engine_ms=%.1f; %d requests queued again", verb, run_id,
                     f"snapshot@seq {rec.snapshot_seq}" if rec.snapshot_dir else "created",
                     len(rec.replay), kinds["forward_backward"], kinds["optim_step"],
                     kinds["load_weights"], stats.compute_ms_by_run.get(run_id, 0.0),
                     rec.requeued)
        return restored

    def _restore_next_pending(self) -> None:
        """Rebuild the next run a restart left to rebuild (background recovery)."""
        run_id, rec = next(iter(self._pending_restore.items()))
        del self._pending_restore[run_id]
        if run_id not in self._resident:
            t0 = time.perf_counter()
            self._restore([rec], "recovered")
            if not self._pending_restore:
                log.info("recovery model=%s done (last run in %.1f ms)", self.base_model,
                         (time.perf_counter() - t0) * 1000)

    def _restore_claimed(self, claimed: list[ClaimedRequest]) -> list[ClaimedRequest]:
        """Rebuild the runs of these requests that are not in the engine (unloaded while
        idle, or idle at a restart); returns the requests whose runs are usable (a run that
        cannot be rebuilt is marked lost, which fails its requests)."""
        creating = {r.run_id for r in claimed if r.kind == "create"}
        absent = {r.run_id for r in claimed if r.run_id and r.run_id not in self._resident
                  and r.run_id not in creating}
        if not absent:
            return claimed
        pending = [self._pending_restore.pop(run) for run in sorted(absent)
                   if run in self._pending_restore]  # still to rebuild after a restart
        restored = set(self._restore(pending, "recovered")) if pending else set()
        recs = [rec for run in sorted(absent - restored - {p.run.id for p in pending})
                if (rec := self.store.run_recovery(run))]
        restored |= set(self._restore(recs, "reloaded"))
        gone = [r.id for r in claimed if r.run_id in absent and r.run_id not in restored]
        if gone:  # lost runs: mark_run_lost failed these requests
            self.notify(dict.fromkeys(gone))
        return [r for r in claimed if r.run_id not in absent or r.run_id in restored]

    def unload_idle_runs(self) -> list[str]:
        """Release the engine state of runs idle for `unload_idle_s` (their requests all
        done, no gradients pending), after a snapshot if they changed since the last one.
        Their next request rebuilds them from that snapshot (`_restore_claimed`)."""
        if self.unload_idle_s <= 0 or self.state_dir is None:
            return []
        now = time.monotonic()
        idle = [run for run in self._unloadable()
                if now - self._last_active.get(run, now) >= self.unload_idle_s]
        unload = self._unload(idle)
        if unload:
            log.info("unloaded %d idle runs of %s (idle >= %.0f s): %s", len(unload),
                     self.base_model, self.unload_idle_s, ", ".join(unload[:8]))
        return unload

    def pinned_runs(self, owner: str) -> int:
        """The tenant's resident runs that cannot be unloaded now (pending gradients or a
        split request in progress): the per-tenant resident bound cannot make room below
        them. Read from request threads; a momentary count is enough."""
        pinned = set(self._dirty) | set(self._splits)
        return sum(1 for run in list(self._resident)
                   if run in pinned and self._owner.get(run) == owner)

    def _unloadable(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Resident runs that may leave the engine now, least recently used first: no pending
        gradients, no split request in progress, none of `exclude`, no queued work."""
        runs = [run for run in self._resident if run not in self._dirty
                and run not in self._splits and run not in exclude]
        busy = set(self.store.queued_counts(set(runs))) if runs else set()
        return sorted((run for run in runs if run not in busy),
                      key=lambda run: (self._last_active.get(run, 0.0), run))

    def _unload(self, runs: list[str]) -> list[str]:
        """Snapshot (if changed since the last snapshot) and release these runs; returns those
        released (a run whose snapshot failed stays)."""
        if not runs or self.state_dir is None:
            return []
        due = {}
        for run in runs:
            if run in self._unsaved:
                row = self.store.get_run(run)
                if row is not None:
                    due[run] = row.next_seq - 1  # everything claimed so far is done
        if due:
            self._write_snapshots(0, due)
        unload = [run for run in runs if run not in self._unsaved]  # snapshot failed: keep
        if not unload:
            return []
        res: P.CycleResult = self.executor.submit(P.CyclePlan(  # type: ignore[assignment]
            0, self.base_model, [P.ReleaseAdapterOp(f"unload:{run}", run) for run in unload])
        ).result()
        for run in unload:
            self._resident.discard(run)
            self._last_active.pop(run, None)
        for r in res.results:
            if not r.ok:
                log.warning("unloading %s: %s", r.request_id, r.error)
        return unload

    def _make_room(self, needed: set[str]) -> list[str]:
        """Before a cycle that needs `needed` runs in the engine: unload least recently used
        idle runs (as idle unloading does) until the resident runs, with the needed ones
        loaded, are within `max_resident_runs` and `max_resident_bytes`, and each tenant's
        within `max_resident_runs_per_tenant` and `max_resident_bytes_per_tenant`. Runs that
        cannot leave (pending gradients, queued work) stay, so a bound may be passed until
        they can; returns the runs unloaded."""
        by_bytes = self.model_dims is not None and bool(
            self.max_resident_bytes or self.max_resident_bytes_per_tenant)
        if self.state_dir is None or not (self.max_resident_runs
                                          or self.max_resident_runs_per_tenant or by_bytes):
            return []
        after = self._resident | needed
        # What each bound is over by (> 0): runs, then bytes; overall, then per tenant.
        over_runs = (len(after) - self.max_resident_runs if self.max_resident_runs else 0)
        runs_of: dict[str, int] = {}
        bytes_of: dict[str, int] = {}
        for run in after:
            t = self._owner.get(run, "")
            runs_of[t] = runs_of.get(t, 0) + 1
            if by_bytes:
                bytes_of[t] = bytes_of.get(t, 0) + self.run_bytes(run)
        limit = self.max_resident_runs_per_tenant
        over = {t: n - limit for t, n in runs_of.items() if limit and n > limit}
        over_bytes = (sum(bytes_of.values()) - self.max_resident_bytes
                      if by_bytes and self.max_resident_bytes else 0)
        blimit = self.max_resident_bytes_per_tenant if by_bytes else 0
        over_b = {t: n - blimit for t, n in bytes_of.items() if blimit and n > blimit}

        def excess() -> bool:
            return (over_runs > 0 or over_bytes > 0 or any(n > 0 for n in over.values())
                    or any(n > 0 for n in over_b.values()))

        if not excess():
            return []
        victims: list[str] = []
        for run in self._unloadable(exclude=needed):
            t = self._owner.get(run, "")
            if over_runs > 0 or over_bytes > 0 or over.get(t, 0) > 0 or over_b.get(t, 0) > 0:
                size = self.run_bytes(run) if by_bytes else 0
                victims.append(run)
                over[t] = over.get(t, 0) - 1
                over_b[t] = over_b.get(t, 0) - size
                over_runs -= 1
                over_bytes -= size
            if not excess():
                break
        unload = self._unload(victims)
        if unload:
            log.info("evicted %d least recently used runs of %s (resident bound %s runs, %s "
                     "bytes; per tenant %s runs, %s bytes): %s", len(unload), self.base_model,
                     self.max_resident_runs or "no", self.max_resident_bytes or "no",
                     limit or "no", self.max_resident_bytes_per_tenant or "no",
                     ", ".join(unload[:8]))
        return unload

    def run_bytes(self, run_id: str) -> int:
        """A run's resident bytes (fp32 adapter weights plus AdamW state, from its spec and
        the model's dims; 0 without dims or for a run the store does not know)."""
        if self.model_dims is None:
            return 0
        size = self._run_bytes.get(run_id)
        if size is None:
            row = self.store.get_run(run_id)
            size = P.resident_bytes(self.model_dims, spec_of(row)) if row is not None else 0
            self._run_bytes[run_id] = size
        return size

    def _size_of(self, stored: str) -> int:
        """Bytes of the files in a checkpoint directory just written (0 if unreadable)."""
        root = self.data_dir if self.data_dir is not None else Path()
        directory = resolve(root, stored)
        return directory_bytes(directory) if directory is not None else 0

    def _wire_result(self, req: ClaimedRequest, engine_result: dict[str, Any]) -> dict[str, Any]:
        """Turn an engine result into the wire response, registering checkpoints."""
        if req.kind == "create":
            if req.payload.get("load_path"):  # created from a checkpoint (LoadWeightsResponse)
                return {"model_id": req.run_id, "path": req.payload["load_path"]}
            return {"model_id": req.run_id}
        if req.kind in ("save_weights", "save_weights_for_sampler"):
            ck = req.payload["checkpoint"]
            size = self._size_of(ck["directory"])
            # A fresh row per try: a failed transaction leaves the one it was given detached.
            self._until_stored(f"checkpoint {ck['name']!r}", lambda: self.store.add_checkpoint(
                CheckpointRow(run_id=req.run_id, owner=req.payload["owner"], kind=ck["kind"],
                              name=ck["name"], directory=ck["directory"],
                              base_model=req.payload["base_model_name"], size_bytes=size,
                              ephemeral=bool(ck.get("ephemeral")), created_at=time.time())))
            if ck.get("sampler_id"):
                self._until_stored(f"sampler {ck['sampler_id']!r}", lambda: self.store.add_sampler(
                    SamplerRow(id=ck["sampler_id"], session_id=ck["session_id"],
                               owner=req.payload["owner"],
                               base_model=req.payload["base_model_name"],
                               canonical_model=self.base_model, model_path=None,
                               checkpoint_dir=ck["directory"], created_at=time.time())))
                return {"path": None, "sampling_session_id": ck["sampler_id"]}
            return {"path": ck["path"]}
        if req.kind == "load_weights":
            return {"path": req.payload["wire"]["path"], "model_id": req.run_id}
        return engine_result
