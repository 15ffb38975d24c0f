"""Scheduler and store: claiming in seq order, gaps, cutoffs, and the wave plan. No torch."""

from __future__ import annotations

import time
from concurrent.futures import Future

import pytest

from bios.server import plan as P
from bios.server.scheduler import ClockLoop, build_plan
from bios.server.store import (
    COMPLETED,
    FAILED,
    QUEUED,
    ClaimedRequest,
    RunRow,
    SeqConflictError,
    Store,
)

MODEL = "m"


def fb_payload(tokens: list[int], forward_only: bool = False) -> dict:
    key = "forward_input" if forward_only else "forward_backward_input"
    datum = {"model_input": {"chunks": [{"tokens": tokens, "type": "encoded_text"}]},
             "loss_fn_inputs": {"target_tokens": {"data": tokens, "dtype": "int64"}}}
    return {"owner": "local", "base_model_name": MODEL,
            "wire": {key: {"data": [datum], "loss_fn": "cross_entropy"}}}


def make_run(store: Store, run_id: str) -> None:
    now = time.time()
    run = RunRow(id=run_id, session_id="s", owner="local", base_model=MODEL,
                 canonical_model=MODEL, rank=4, seed=0, alpha=32.0, train_attn=True,
                 train_mlp=True, train_unembed=False, user_metadata="{}", created_at=now,
                 last_request_time=now, next_seq=0)
    store.create_run(run, {"wire": {"run": run_id}})


def submit(store: Store, run_id: str, seq: int, kind: str = "forward_backward",
           payload: dict | None = None) -> str:
    return store.submit(owner="local", run_id=run_id, seq_id=seq, kind=kind, base_model=MODEL,
                        payload=payload or fb_payload([1, 2, seq]))


def claim_seqs(store: Store, cutoff: float | None = None) -> list[tuple[str | None, int | None]]:
    claimed = store.claim_cycle(MODEL, cutoff=time.time() if cutoff is None else cutoff)
    return [(c.run_id, c.seq_id) for c in claimed]


def test_claim_takes_contiguous_seq_and_waits_for_gap(store: Store) -> None:
    make_run(store, "r1")
    submit(store, "r1", 1)
    submit(store, "r1", 3)  # seq 2 has not arrived yet
    assert store.has_queued(MODEL)
    assert claim_seqs(store) == [("r1", 0), ("r1", 1)]
    assert claim_seqs(store) == []  # still waiting for seq 2
    submit(store, "r1", 2)
    assert claim_seqs(store) == [("r1", 2), ("r1", 3)]
    assert store.get_run("r1").next_seq == 4
    assert not store.has_queued(MODEL)


def test_rejected_slot_does_not_block_later_requests(store: Store) -> None:
    make_run(store, "r1")
    store.claim_cycle(MODEL, cutoff=time.time())  # seq 0
    store.record_rejected(owner="local", run_id="r1", seq_id=1, kind="forward_backward",
                          base_model=MODEL, error="bad")
    store.record_rejected(owner="local", run_id="r1", seq_id=1, kind="forward_backward",
                          base_model=MODEL, error="bad")  # a second rejection is a no-op
    submit(store, "r1", 2)
    assert claim_seqs(store) == [("r1", 2)]
    assert store.get_run("r1").next_seq == 3


def test_request_after_cycle_start_waits_for_next_cycle(store: Store) -> None:
    make_run(store, "r1")
    cutoff = time.time()
    time.sleep(0.01)
    submit(store, "r1", 1)
    assert claim_seqs(store, cutoff) == [("r1", 0)]
    assert claim_seqs(store) == [("r1", 1)]


def test_retry_is_idempotent_and_conflict_detected(store: Store) -> None:
    make_run(store, "r1")
    a = submit(store, "r1", 1)
    assert submit(store, "r1", 1) == a
    with pytest.raises(SeqConflictError):
        submit(store, "r1", 1, payload=fb_payload([9, 9]))
    row = store.get_request(a)
    assert row is not None and row.status == QUEUED and row.seq_id == 1


def _claimed(run: str, seq: int, kind: str, payload: dict | None = None) -> ClaimedRequest:
    return ClaimedRequest(f"{run}-{seq}", run, seq, kind, payload or fb_payload([1, 2]))


def test_plan_batches_passes_across_runs_and_keeps_each_runs_order() -> None:
    opt = {"owner": "local", "base_model_name": MODEL, "wire": {"adam_params": {}}}
    claimed = [
        _claimed("a", 1, "forward_backward"), _claimed("a", 2, "forward_backward"),
        _claimed("a", 3, "optim_step", opt), _claimed("a", 4, "forward_backward"),
        _claimed("b", 1, "forward_backward"), _claimed("b", 2, "optim_step", opt),
    ]
    plan = build_plan(7, MODEL, claimed, {})
    shape = [([o.request_id for o in s.ops] if isinstance(s, P.PassGroup) else s.request_id)
             for s in plan.steps]
    assert shape == [["a-1", "a-2", "b-1"], "a-3", "b-2", ["a-4"]]
    assert plan.num_ops == 6


class RecordingExecutor:
    def __init__(self) -> None:
        self.plans: list[P.CyclePlan] = []

    def submit(self, plan: P.CyclePlan) -> Future[P.CycleResult]:
        self.plans.append(plan)
        results = []
        for step in plan.steps:
            ops = step.ops if isinstance(step, P.PassGroup) else [step]
            for op in ops:
                ok = not (isinstance(op, P.ForwardBackwardOp) and op.data[0].tokens[0] == 99)
                results.append(P.OpResult(op.request_id, ok=ok, result={"metrics": {}},
                                          error=None if ok else "boom", category="user"))
        f: Future[P.CycleResult] = Future()
        f.set_result(P.CycleResult(plan.cycle_id, results, P.CycleStats(runs=1)))
        return f


def test_clock_cycle_records_results_and_failures_alone(store: Store) -> None:
    make_run(store, "r1")
    make_run(store, "r2")
    ok = submit(store, "r1", 1)
    bad = store.submit(owner="local", run_id="r2", seq_id=1, kind="forward_backward",
                       base_model=MODEL, payload=fb_payload([99, 1]))
    notified: list[str] = []
    counter = iter(range(1, 100))
    ex = RecordingExecutor()
    loop = ClockLoop(base_model=MODEL, store=store, executor=ex, period=0,
                     notify=notified.extend, cycle_ids=lambda: next(counter))
    entry = loop.run_cycle()
    assert entry is not None and entry.ops == 4
    assert store.get_request(ok).status == COMPLETED
    row = store.get_request(bad)
    assert row.status == FAILED and row.error == "boom" and row.error_category == "user"
    assert set(notified) >= {ok, bad}
    assert loop.run_cycle() is None  # nothing left
    assert "cycle 1 model=m runs=1 ops=4" in entry.line()



def test_a_store_error_recording_results_is_retried_until_the_store_accepts_them(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full while the clock records a cycle's results: the finished results are kept
    and recorded once the store takes writes again (the engine work is not run again), so
    the requests complete with their results and their waiters are told; nothing stays
    `running`."""
    from sqlalchemy.exc import OperationalError

    make_run(store, "r1")
    ok = submit(store, "r1", 1)
    real = store.finish_many
    refused: list[int] = []

    def full_disk(outcomes, cycle_id=None):  # type: ignore[no-untyped-def]
        if any(o.request_id == ok for o in outcomes) and len(refused) < 3:
            refused.append(1)
            raise OperationalError("UPDATE requests", {}, Exception("database or disk is full"))
        return real(outcomes, cycle_id=cycle_id)

    monkeypatch.setattr(store, "finish_many", full_disk)
    notified: list[str] = []
    counter = iter(range(1, 100))
    ex = RecordingExecutor()
    loop = ClockLoop(base_model=MODEL, store=store, executor=ex, period=0,
                     notify=notified.extend, cycle_ids=lambda: next(counter))
    loop.record_retry_s = 0.01
    entry = loop.run_cycle()
    assert entry is not None and len(refused) == 3
    row = store.get_request(ok)
    assert row.status == COMPLETED and row.result is not None and "metrics" in row.result
    assert ok in notified
    assert len(ex.plans) == 1  # recorded, not run again
    assert loop.run_cycle() is None


def test_a_stop_ends_the_retries_and_leaves_the_requests_for_the_next_start(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    make_run(store, "r1")
    ok = submit(store, "r1", 1)

    def full_disk(outcomes, cycle_id=None):  # type: ignore[no-untyped-def]
        loop._stop.set()  # a SIGTERM while the disk is full
        raise OperationalError("UPDATE requests", {}, Exception("database or disk is full"))

    monkeypatch.setattr(store, "finish_many", full_disk)
    counter = iter(range(1, 100))
    loop = ClockLoop(base_model=MODEL, store=store, executor=RecordingExecutor(), period=0,
                     notify=lambda ids: None, cycle_ids=lambda: next(counter))
    with pytest.raises(OperationalError):
        loop.run_cycle()
    assert store.get_request(ok).status == "running"  # the next start queues it again
