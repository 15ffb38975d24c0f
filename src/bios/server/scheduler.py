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
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from bios.server import plan as P
from bios.server.store import CheckpointRow, ClaimedRequest, RunWork, SamplerRow, Store

log = logging.getLogger("bios.scheduler")

PASS_KINDS = ("forward", "forward_backward")


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
        return P.CreateAdapterOp(req.id, run_id, run_spec)
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
        return P.SaveStateOp(req.id, run_id, ck["directory"], ck["kind"], p["base_model_name"])
    if req.kind == "load_weights":
        return P.LoadStateOp(req.id, run_id, p["directory"], bool(wire.get("optimizer")))
    raise ValueError(f"unknown request kind {req.kind!r}")


def build_plan(cycle_id: int, base_model: str, claimed: list[ClaimedRequest],
               specs: dict[str, P.AdapterSpec]) -> P.CyclePlan:
    """Order claimed requests into waves: batched passes across runs, then single ops."""
    queues: dict[str, deque[P.Step]] = {}
    for req in claimed:  # claimed is in (run, seq) order
        queues.setdefault(req.run_id or "", deque()).append(to_op(req, specs.get(req.run_id or "")))
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
    return P.CyclePlan(cycle_id, base_model, steps)


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


# ----------------------------------------------------------------------------- the loop


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

    def line(self) -> str:
        kinds = ",".join(f"{k}:{v}" for k, v in sorted(self.ops_by_kind.items()))
        return (f"cycle {self.cycle_id} model={self.base_model} runs={self.runs} "
                f"ops={self.ops} [{kinds}] tokens={self.tokens} passes={self.passes} "
                f"engine_ms={self.engine_ms:.1f} total_ms={self.total_ms:.1f}")


class ClockLoop:
    """Runs the clock cycles of one base model in a dedicated thread.

    period > 0: a cycle starts every `period` seconds (a cycle that overruns makes the next
    start at once); requests stored after a cycle's start wait for the next cycle.
    period == 0: continuous; a cycle starts as soon as work is queued and the engine is free.
    """

    def __init__(self, *, base_model: str, store: Store, executor: Executor, period: float,
                 notify: Callable[[list[str]], None], cycle_ids: Callable[[], int]):
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

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def wake(self) -> None:
        """Called after a submit: in continuous mode, start a cycle now if idle."""
        self._wake.set()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            trained = sampled = False
            try:
                now = time.monotonic()
                if self.period == 0 or now >= next_tick:
                    if self.period > 0:
                        next_tick = max(next_tick + self.period, now)
                    trained = self.run_cycle() is not None
                sampled = self.run_sampling_chunk()
            except Exception:  # a bug here must not kill the clock; requests fail visibly
                log.exception("cycle failed for %s", self.base_model)
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
        sample_plan = P.SamplePlan(admit=admit, max_decode_steps=self.decode_chunk)
        try:
            res: P.SampleResult = self.executor.submit(sample_plan).result()  # type: ignore[arg-type]
        except Exception as e:
            log.exception("sampler failed")
            res = P.SampleResult([P.OpResult(r.id, ok=False, error=f"sampler error: {e}")
                                  for r in claimed], active=0)
        for op in res.finished:
            if op.ok:
                self.store.finish(op.request_id, result=op.result or {})
            else:
                self.store.finish(op.request_id, error=op.error or "failed",
                                  category=op.category)
        self._sampling_active = res.active
        if res.finished:
            self.notify([op.request_id for op in res.finished])
        return True

    def run_cycle(self) -> CycleLog | None:
        """Claim what is runnable now, execute it as one cycle, record the outcome."""
        started = time.time()
        claimed = self.store.claim_cycle(self.base_model, cutoff=started)
        if not claimed:
            return None
        t0 = time.perf_counter()
        specs = self._specs_for(claimed)
        cycle_id = self._cycle_ids()
        plan = build_plan(cycle_id, self.base_model, claimed, specs)
        by_id = {r.id: r for r in claimed}
        try:
            result = self.executor.submit(plan).result()
        except Exception as e:  # the engine itself broke: fail this cycle's requests
            log.exception("engine failed on cycle %d", cycle_id)
            result = P.CycleResult(cycle_id, [
                P.OpResult(r.id, ok=False, error=f"engine error: {e}", category="server")
                for r in claimed])
        done: list[str] = []
        for op in result.results:
            req = by_id.get(op.request_id)
            if req is None:
                continue
            if op.ok:
                self.store.finish(req.id, result=self._wire_result(req, op.result or {}),
                                  cycle_id=cycle_id)
            else:
                self.store.finish(req.id, error=op.error or "failed",
                                  category=op.category, cycle_id=cycle_id)
            done.append(req.id)
        missing = [r.id for r in claimed if r.id not in set(done)]
        for rid in missing:  # never leave a claimed request hanging
            self.store.finish(rid, error="the engine returned no result for this request",
                              category="server", cycle_id=cycle_id)
        total_ms = (time.perf_counter() - t0) * 1000
        st = result.stats
        self.store.record_cycle(self.base_model, started, st.engine_ms, total_ms, st.runs,
                                plan.num_ops, st.tokens, st.passes, cycle_id=cycle_id,
                                run_work=run_work(plan, st))
        self.notify(done + missing)
        entry = CycleLog(cycle_id, self.base_model, st.runs, plan.num_ops, st.tokens, st.passes,
                         st.engine_ms, total_ms, dict(st.ops_by_kind))
        self.last_cycle = entry
        log.info(entry.line())
        return entry

    def _specs_for(self, claimed: list[ClaimedRequest]) -> dict[str, P.AdapterSpec]:
        specs: dict[str, P.AdapterSpec] = {}
        for req in claimed:
            if req.kind == "create" and req.run_id:
                run = self.store.get_run(req.run_id)
                assert run is not None
                specs[req.run_id] = P.AdapterSpec(
                    rank=run.rank, seed=run.seed, alpha=run.alpha, train_attn=run.train_attn,
                    train_mlp=run.train_mlp, train_unembed=run.train_unembed)
        return specs

    def _wire_result(self, req: ClaimedRequest, engine_result: dict[str, Any]) -> dict[str, Any]:
        """Turn an engine result into the wire response, registering checkpoints."""
        if req.kind == "create":
            return {"model_id": req.run_id}
        if req.kind in ("save_weights", "save_weights_for_sampler"):
            ck = req.payload["checkpoint"]
            self.store.add_checkpoint(CheckpointRow(
                run_id=req.run_id, owner=req.payload["owner"], kind=ck["kind"], name=ck["name"],
                directory=ck["directory"], base_model=req.payload["base_model_name"],
                size_bytes=int(engine_result.get("size_bytes", 0)),
                ephemeral=bool(ck.get("ephemeral")), created_at=time.time()))
            if ck.get("sampler_id"):
                self.store.add_sampler(SamplerRow(
                    id=ck["sampler_id"], session_id=ck["session_id"], owner=req.payload["owner"],
                    base_model=req.payload["base_model_name"], canonical_model=self.base_model,
                    model_path=None, checkpoint_dir=ck["directory"], created_at=time.time()))
                return {"path": None, "sampling_session_id": ck["sampler_id"]}
            return {"path": ck["path"]}
        if req.kind == "load_weights":
            return {"path": req.payload["wire"]["path"], "model_id": req.run_id}
        return engine_result
