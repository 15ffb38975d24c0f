"""Per-run metrics and engine utilization: recorded by the clock, derived by the store. No torch."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future

import pytest
from test_scheduler import MODEL, fb_payload, make_run, submit

from bios.server import plan as P
from bios.server.scheduler import ClockLoop, run_work
from bios.server.store import RunWork, Store
from postgres_server import find_bindir

OPT = {"owner": "local", "base_model_name": MODEL, "wire": {"adam_params": {}}}
NO_PG = find_bindir() is None


class TimedExecutor:
    """Completes every op; reports per-run tokens and compute like the engine. `during` runs
    while the "engine" is busy (to submit a request mid-cycle)."""

    def __init__(self, engine_ms: float = 40.0) -> None:
        self.engine_ms = engine_ms
        self.during: Callable[[], None] | None = None

    def submit(self, plan: P.CyclePlan) -> Future[P.CycleResult]:
        if self.during is not None:
            time.sleep(0.01)
            self.during()
            self.during = None
            time.sleep(0.01)
        results, tokens, compute = [], {}, {}
        for step in plan.steps:
            for op in step.ops if isinstance(step, P.PassGroup) else [step]:
                results.append(P.OpResult(op.request_id, ok=True, result={"metrics": {}}))
                n = op.num_tokens if isinstance(op, P.ForwardBackwardOp) else 0
                tokens[op.run_id] = tokens.get(op.run_id, 0) + n
                compute[op.run_id] = compute.get(op.run_id, 0.0) + 10.0
        stats = P.CycleStats(runs=len(tokens), tokens=sum(tokens.values()), passes=1,
                             engine_ms=self.engine_ms, tokens_by_run=tokens,
                             compute_ms_by_run=compute)
        f: Future[P.CycleResult] = Future()
        f.set_result(P.CycleResult(plan.cycle_id, results, stats))
        return f


def clock(store: Store, ex: TimedExecutor) -> ClockLoop:
    counter = iter(range(1, 1000))
    return ClockLoop(base_model=MODEL, store=store, executor=ex, period=0,
                     notify=lambda ids: None, cycle_ids=lambda: next(counter))


def test_work_cycles_tokens_compute_steps_and_requests(store: Store) -> None:
    make_run(store, "r1")
    make_run(store, "r2")
    loop = clock(store, TimedExecutor())
    submit(store, "r1", 1, payload=fb_payload([1, 2, 3, 4]))
    submit(store, "r1", 2, kind="optim_step", payload=OPT)
    submit(store, "r2", 1, payload=fb_payload([5, 6]))
    assert loop.run_cycle() is not None  # creates + both runs' work in one cycle
    submit(store, "r1", 3, payload=fb_payload([7, 8, 9]))
    submit(store, "r1", 4, kind="optim_step", payload=OPT)
    assert loop.run_cycle() is not None
    m1, m2 = store.run_metrics("r1"), store.run_metrics("r2")
    assert (m1["cycles_with_work"], m1["tokens"], m1["steps"], m1["requests"]) == (2, 7, 2, 5)
    assert (m2["cycles_with_work"], m2["tokens"], m2["steps"], m2["requests"]) == (1, 2, 0, 2)
    assert m1["compute_s"] == pytest.approx(5 * 0.010)  # 10 ms per op from the executor
    assert m1["missed_cycles"] == m2["missed_cycles"] == 0
    assert m1["queue_wait_s"] >= 0 and m1["active_s"] > 0
    assert m1["engine_busy_s"] == pytest.approx(min(0.080, m1["active_s"]))
    assert m1["engine_idle_s"] == pytest.approx(m1["active_s"] - m1["engine_busy_s"])
    # cycle ids in the cycles table are the plans' ids (the ones requests carry)
    assert [c["cycle_id"] for c in store.engine_utilization(MODEL, 10)] == [1, 2]


def test_request_stored_during_another_runs_cycle_is_a_missed_cycle(store: Store) -> None:
    make_run(store, "r1")
    make_run(store, "r2")
    ex = TimedExecutor()
    loop = clock(store, ex)
    loop.run_cycle()  # both creates
    submit(store, "r1", 1)
    ex.during = lambda: submit(store, "r2", 1)  # r2's request arrives after the cutoff
    loop.run_cycle()
    assert store.run_metrics("r2")["missed_cycles"] == 1
    assert store.run_metrics("r1")["missed_cycles"] == 0
    loop.run_cycle()  # r2's request runs now
    m2 = store.run_metrics("r2")
    assert (m2["cycles_with_work"], m2["missed_cycles"]) == (2, 1)
    # its wait spans the cycle it missed
    assert m2["queue_wait_s"] >= 0.01


def test_request_stored_between_cycles_is_not_a_miss(store: Store) -> None:
    make_run(store, "r1")
    loop = clock(store, TimedExecutor())
    loop.run_cycle()
    submit(store, "r1", 1)
    loop.run_cycle()
    assert store.run_metrics("r1")["missed_cycles"] == 0


def test_run_work_falls_back_to_the_plan_without_engine_stats() -> None:
    plan = P.CyclePlan(1, MODEL, [
        P.PassGroup([P.ForwardBackwardOp("a1", "a", [P.DatumRows([1, 2, 3], {})], "ce", {}),
                     P.ForwardBackwardOp("b1", "b", [P.DatumRows([1], {})], "ce", {})]),
        P.OptimStepOp("a2", "a", {}),
    ])
    work = run_work(plan, P.CycleStats(engine_ms=100.0))
    assert work["a"] == RunWork(tokens=3, ops=2, compute_ms=75.0)
    assert work["b"] == RunWork(tokens=1, ops=1, compute_ms=25.0)


def test_engine_utilization_busy_fraction(store: Store) -> None:
    t = time.time() - 10
    store.record_cycle(MODEL, t, 250.0, 300.0, 1, 2, 64, 1, cycle_id=5)
    store.record_cycle(MODEL, t + 1.0, 500.0, 600.0, 2, 4, 128, 1, cycle_id=6)
    rows = store.engine_utilization(MODEL, 10)
    assert [r["cycle_id"] for r in rows] == [5, 6]
    assert rows[0]["busy_fraction"] == pytest.approx(0.25)  # 250 ms of the 1 s to cycle 6
    assert 0 < rows[1]["busy_fraction"] < 0.1  # the newest: to now (9 s)
    assert [r["cycle_id"] for r in store.engine_utilization(MODEL, 1)] == [6]
    assert store.engine_utilization("other", 10) == []


def test_metrics_of_unknown_run_raise(store: Store) -> None:
    with pytest.raises(KeyError):
        store.run_metrics("nope")

