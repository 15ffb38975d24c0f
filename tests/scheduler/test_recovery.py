"""Crash recovery without torch: the store's recovery plan, snapshots, replay, and engine errors.

A `FakeEngine` stands in for the real one: a run's state is a few floats that every state
change moves in an order-dependent way (gradients accumulate, AdamW-like momentum, a step
counter), and snapshots are JSON files written atomically. "Crashing" = dropping the clock
and engine mid-cycle and building new ones on the same store, as a restarted server does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from test_scheduler import MODEL, fb_payload, make_run, submit

from bios.server import plan as P
from bios.server.scheduler import ClockLoop
from bios.server.store import COMPLETED, FAILED, QUEUED, RUNNING, RunRow, Store

OPT = {"owner": "local", "base_model_name": MODEL, "wire": {"adam_params": {}}}


class FakeEngine:
    """An executor whose runs are {w, g, m, steps}; every op is deterministic."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, float]] = {}
        self.plans: list[P.CyclePlan] = []
        self.optim_steps = 0  # optim_steps applied by this engine (replays included)

    def submit(self, plan: P.CyclePlan) -> Future[P.CycleResult]:
        self.plans.append(plan)
        results = []
        for step in plan.steps:
            for op in step.ops if isinstance(step, P.PassGroup) else [step]:
                try:
                    results.append(P.OpResult(op.request_id, True, self._apply(op)))
                except Exception as e:
                    results.append(P.OpResult(op.request_id, False, error=str(e)))
        f: Future[P.CycleResult] = Future()
        f.set_result(P.CycleResult(plan.cycle_id, results, P.CycleStats(runs=1)))
        return f

    def _apply(self, op: P.Step) -> dict:
        if isinstance(op, P.CreateAdapterOp):
            self.runs[op.run_id] = {"w": float(op.spec.seed), "g": 0.0, "m": 0.0, "steps": 0}
            return {}
        run = self.runs[op.run_id]
        if isinstance(op, P.ForwardBackwardOp):
            if not op.forward_only:
                run["g"] += sum(sum(d.tokens) for d in op.data) * (1 + run["w"] / 7)
            return {"metrics": {"loss:sum": run["w"]}}
        if isinstance(op, P.OptimStepOp):
            run["m"] = 0.5 * run["m"] + run["g"]
            run["w"] = run["w"] * 0.9 - 0.01 * run["m"]
            run["g"] = 0.0
            run["steps"] += 1
            self.optim_steps += 1
            return {"metrics": {}}
        if isinstance(op, P.SaveStateOp):
            d = Path(op.directory)
            tmp = d.parent / f".{d.name}.tmp"
            tmp.mkdir(parents=True)
            (tmp / "state.json").write_text(json.dumps({k: run[k] for k in ("w", "m", "steps")}))
            os.rename(tmp, d)
            return {"path": str(d)}
        if isinstance(op, P.LoadStateOp):
            saved = json.loads((Path(op.directory) / "state.json").read_text())
            run.update(w=saved["w"], g=0.0, m=saved["m"] if op.optimizer else 0.0,
                       steps=saved["steps"])
            return {"path": op.directory}
        if isinstance(op, P.ReleaseAdapterOp):
            self.runs.pop(op.run_id, None)
            return {}
        raise ValueError(op)


def clock(store: Store, executor, state_dir: Path | None, steps: int = 2) -> ClockLoop:
    counter = iter(range(store.next_cycle_id(), 1_000_000))
    return ClockLoop(base_model=MODEL, store=store, executor=executor, period=0,
                     notify=lambda ids: None, cycle_ids=lambda: next(counter),
                     state_dir=state_dir, snapshot_steps=steps, snapshot_seconds=3600)


def train(store: Store, loop: ClockLoop, run: str, first_seq: int, steps: int) -> int:
    """`steps` x (forward_backward, optim_step), one cycle each pair; returns the next seq."""
    seq = first_seq
    for _ in range(steps):
        submit(store, run, seq, payload=fb_payload([seq % 5, 3]))
        store.submit(owner="local", run_id=run, seq_id=seq + 1, kind="optim_step",
                     base_model=MODEL, payload=OPT)
        assert loop.run_cycle() is not None
        seq += 2
    return seq


def statuses(store: Store, run: str) -> dict[int, str]:
    with store.tx() as s:
        from bios.server.store import RequestRow

        rows = s.query(RequestRow).filter(RequestRow.run_id == run).all()
        return {r.seq_id: r.status for r in rows}


# ----------------------------------------------------------------------------- the store


def test_prepare_recovery_requeues_running_and_lists_completed_state_changes(store) -> None:
    make_run(store, "r1")
    store.claim_cycle(MODEL, cutoff=time.time())
    store.finish(_id(store, "r1", 0), result={})
    fb1 = submit(store, "r1", 1)
    fwd2 = submit(store, "r1", 2, "forward", fb_payload([4, 4], forward_only=True))
    opt3 = store.submit(owner="local", run_id="r1", seq_id=3, kind="optim_step",
                        base_model=MODEL, payload=OPT)
    bad4 = submit(store, "r1", 4)
    fb5 = submit(store, "r1", 5)
    opt6 = store.submit(owner="local", run_id="r1", seq_id=6, kind="optim_step",
                        base_model=MODEL, payload=OPT)
    assert [c.seq_id for c in store.claim_cycle(MODEL, cutoff=time.time())] == [1, 2, 3, 4, 5, 6]
    for rid in (fb1, fwd2, opt3):
        store.finish(rid, result={})
    store.finish(bad4, error="boom", category="user")
    # The crash: fb5 and opt6 were running; a later request is queued; a sample was decoding.
    queued7 = submit(store, "r1", 7)
    sample = store.submit(owner="local", run_id=None, sampler_id="smp", seq_id=0, kind="sample",
                          base_model=MODEL, payload={"sample_op": {}})
    store.claim_samples(MODEL, limit=8)
    assert store.get_run("r1").next_seq == 7

    [rec] = store.prepare_recovery(MODEL)
    assert rec.run.id == "r1" and rec.snapshot_dir is None and rec.snapshot_seq == 0
    # Completed state changes only: not the forward, not the failed fb, not running ones.
    assert [(q.seq_id, q.kind) for q in rec.replay] == [(1, "forward_backward"),
                                                       (3, "optim_step")]
    assert rec.replay[0].payload == fb_payload([1, 2, 1])
    assert rec.requeued == 2
    assert store.get_run("r1").next_seq == 5  # the first request whose result is not recorded
    for rid in (fb5, opt6, queued7, sample):
        assert store.get_request(rid).status == QUEUED
    assert store.get_request(bad4).status == FAILED
    assert [c.seq_id for c in store.claim_cycle(MODEL, cutoff=time.time())] == [5, 6, 7]

    # With a snapshot at seq 3, nothing before it is replayed.
    store.set_snapshot("r1", "/somewhere/seq-3", 3)
    [rec] = store.prepare_recovery(MODEL)
    assert rec.snapshot_dir == "/somewhere/seq-3" and rec.snapshot_seq == 3 and rec.replay == []


def _id(store: Store, run: str, seq: int) -> str:
    with store.tx() as s:
        from bios.server.store import RequestRow

        return s.query(RequestRow.id).filter(RequestRow.run_id == run,
                                             RequestRow.seq_id == seq).scalar()


def test_prepare_recovery_skips_uncreated_and_lost_runs(store) -> None:
    make_run(store, "queued")  # its create never ran
    make_run(store, "running")
    make_run(store, "lost")
    store.mark_run_lost("lost", "gone")
    claimed = store.claim_cycle(MODEL, cutoff=time.time())
    assert {c.run_id for c in claimed} == {"queued", "running"}
    recs = store.prepare_recovery(MODEL)
    assert recs == []  # creates were running: queued again, no state to rebuild
    assert store.get_request(_id(store, "running", 0)).status == QUEUED
    assert store.get_run("running").next_seq == 0


def test_old_database_gets_the_new_nullable_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    Store(url).close()
    con = sqlite3.connect(tmp_path / "old.sqlite")
    con.execute("ALTER TABLE training_runs DROP COLUMN snapshot_dir")
    con.execute("ALTER TABLE training_runs DROP COLUMN snapshot_seq")
    con.commit()
    con.close()
    store = Store(url)  # an older server's database: the columns are added
    store.create_session("local", [], None)
    make_run(store, "r1")
    store.set_snapshot("r1", "/x", 4)
    assert (store.get_run("r1").snapshot_dir, store.get_run("r1").snapshot_seq) == ("/x", 4)


# ----------------------------------------------------------------------------- clock + replay


def reference(steps: int) -> dict[str, float]:
    """The run's state after `steps` training steps, without any crash."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        s = Store(f"sqlite:///{Path(d) / 'ref.sqlite'}")
        s.create_session("local", [], None)
        make_run(s, "r1")
        eng = FakeEngine()
        train(s, clock(s, eng, None), "r1", 1, steps)
        s.close()
        return dict(eng.runs["r1"])


@pytest.mark.parametrize("snapshot_steps", [2, 0])
def test_crash_mid_cycle_replays_and_each_step_applies_once(store, tmp_path, snapshot_steps):
    """snapshot_steps=2: snapshot + replay of the steps after it; 0: pure replay from create."""
    make_run(store, "r1")
    state = tmp_path / "state"
    eng1 = FakeEngine()
    loop1 = clock(store, eng1, state, steps=snapshot_steps)
    seq = train(store, loop1, "r1", 1, 5)  # seqs 1..10
    run = store.get_run("r1")
    if snapshot_steps:
        # Snapshots after steps 2 and 4 (seq 4, 8); only the newest is kept on disk.
        assert run.snapshot_seq == 8 and Path(run.snapshot_dir).is_dir()
        assert [p.name for p in (state / "r1").iterdir()] == [Path(run.snapshot_dir).name]
    else:
        assert run.snapshot_dir is None and not state.exists()
    # Cycle 6 is claimed; the crash comes after its fb was recorded, before its optim_step.
    fb = submit(store, "r1", seq, payload=fb_payload([seq % 5, 3]))
    opt = store.submit(owner="local", run_id="r1", seq_id=seq + 1, kind="optim_step",
                       base_model=MODEL, payload=OPT)
    claimed = store.claim_cycle(MODEL, cutoff=time.time())
    assert [c.id for c in claimed] == [fb, opt]
    store.finish(fb, result={"metrics": {}})
    assert statuses(store, "r1")[seq + 1] == RUNNING

    eng2 = FakeEngine()  # the restarted server: empty engine, same store and state dir
    loop2 = clock(store, eng2, state, steps=snapshot_steps)
    assert loop2.recover() == ["r1"]
    [plan] = eng2.plans
    kinds = [s.kind if not isinstance(s, P.PassGroup) else "fbs" for s in plan.steps]
    if snapshot_steps:  # create, load the step-4 snapshot, replay step 5 and the recorded fb
        assert kinds == ["create", "load", "fbs", "optim_step", "fbs"]
    else:  # create, then all 5 steps and the recorded fb
        assert kinds == ["create"] + ["fbs", "optim_step"] * 5 + ["fbs"]
    assert store.get_request(opt).status == QUEUED
    assert loop2.run_cycle() is not None  # the re-queued optim_step runs, once
    assert store.get_request(opt).status == COMPLETED
    assert eng2.runs["r1"] == pytest.approx(reference(6))
    # The loop goes on after the restart exactly as it would have without a crash.
    train(store, loop2, "r1", seq + 2, 2)
    assert eng2.runs["r1"] == pytest.approx(reference(8))
    assert all(v == COMPLETED for v in statuses(store, "r1").values())


def test_snapshot_waits_for_clean_gradients_and_follows_a_load(store, tmp_path) -> None:
    make_run(store, "r1")
    state = tmp_path / "state"
    loop = clock(store, FakeEngine(), state, steps=1)
    assert loop.run_cycle() is not None  # create: no snapshot needed (replay is free)
    submit(store, "r1", 1)
    loop.run_cycle()  # fb alone: gradients pending, no snapshot yet
    assert store.get_run("r1").snapshot_dir is None
    store.submit(owner="local", run_id="r1", seq_id=2, kind="optim_step", base_model=MODEL,
                 payload=OPT)
    submit(store, "r1", 3, "forward", fb_payload([1], forward_only=True))
    loop.run_cycle()  # optim (clean) then a forward (no change): snapshot through seq 3
    assert store.get_run("r1").snapshot_seq == 3
    ck = store.get_run("r1").snapshot_dir
    store.submit(owner="local", run_id="r1", seq_id=4, kind="load_weights", base_model=MODEL,
                 payload={**OPT, "wire": {"optimizer": True, "path": "p"}, "directory": ck})
    loop.snapshot_steps = 100  # a load is snapshotted at once whatever the interval
    loop.run_cycle()
    assert store.get_run("r1").snapshot_seq == 4


def test_unreplayable_run_is_marked_lost_and_others_recover(store, tmp_path) -> None:
    make_run(store, "good")
    make_run(store, "bad")
    loop = clock(store, FakeEngine(), None)
    loop.run_cycle()
    for run in ("good", "bad"):
        submit(store, run, 1)
    store.submit(owner="local", run_id="bad", seq_id=2, kind="load_weights", base_model=MODEL,
                 payload={**OPT, "wire": {"optimizer": True, "path": "p"},
                          "directory": str(tmp_path)})
    claimed = store.claim_cycle(MODEL, cutoff=time.time())
    for c in claimed:  # recorded as done, but the checkpoint it loaded is gone by the restart
        store.finish(c.id, result={})
    pending = submit(store, "bad", 3)
    eng = FakeEngine()
    assert clock(store, eng, None).recover() == ["good"]
    assert "good" in eng.runs and "bad" not in eng.runs  # released
    run = store.get_run("bad")
    assert run.lost_reason and "could not be rebuilt" in run.lost_reason
    row = store.get_request(pending)
    assert row.status == FAILED and row.error == run.lost_reason


# ----------------------------------------------------------------------------- unloading


def idle_clock(store: Store, executor, state_dir: Path, unload_idle_s: float) -> ClockLoop:
    loop = clock(store, executor, state_dir, steps=100)  # no periodic snapshot in the way
    loop.unload_idle_s = unload_idle_s
    return loop


def test_idle_run_is_unloaded_and_rebuilt_by_its_next_request(store, tmp_path) -> None:
    """A run idle past unload_idle_s leaves the engine after a snapshot of its state; a run
    holding gradients stays. The next request rebuilds the run from the snapshot and
    training goes on as if it had never left."""
    make_run(store, "r1")
    make_run(store, "r2")
    eng = FakeEngine()
    loop = idle_clock(store, eng, tmp_path / "state", unload_idle_s=600)
    seq = train(store, loop, "r1", 1, 3)
    submit(store, "r2", 1)  # a forward_backward with no optim_step: gradients pending
    assert loop.run_cycle() is not None
    assert loop.unload_idle_runs() == []  # not idle long enough yet
    # 10 minutes pass (moved back by hand, not slept: a loaded machine's cycles take any
    # time, so a short real idle limit made this test depend on the machine's speed).
    loop._last_active = {run: t - 601 for run, t in loop._last_active.items()}
    assert loop.unload_idle_runs() == ["r1"]
    assert "r1" not in eng.runs and "r2" in eng.runs
    run = store.get_run("r1")
    assert run.snapshot_seq == seq - 1 and Path(run.snapshot_dir).is_dir()
    train(store, loop, "r1", seq, 2)
    kinds = [s.kind for s in eng.plans[-3].steps]  # the rebuild, before the step's cycle
    assert kinds == ["create", "load"]
    assert eng.runs["r1"] == pytest.approx(reference(5))
    assert all(v == COMPLETED for v in statuses(store, "r1").values())


def test_restart_rebuilds_recent_runs_now_and_idle_ones_on_demand(store, tmp_path) -> None:
    for run in ("recent", "old"):
        make_run(store, run)
    loop1 = clock(store, FakeEngine(), tmp_path / "state")
    for run in ("recent", "old"):
        train(store, loop1, run, 1, 2)
    with store.tx() as s:  # "old" last heard from an hour ago
        s.query(RunRow).filter(RunRow.id == "old").update(
            {RunRow.last_request_time: time.time() - 3600})
    eng = FakeEngine()
    loop2 = idle_clock(store, eng, tmp_path / "state", unload_idle_s=600)
    assert loop2.recover() == ["recent"]
    assert set(eng.runs) == {"recent"}
    eng_ref = FakeEngine()
    store_ref = Store(f"sqlite:///{tmp_path / 'ref.sqlite'}")
    store_ref.create_session("local", [], None)
    make_run(store_ref, "old")
    train(store_ref, clock(store_ref, eng_ref, None), "old", 1, 3)
    train(store, loop2, "old", 5, 1)  # rebuilt (create + replay of 2 steps), then step 3
    assert eng.runs["old"] == pytest.approx(eng_ref.runs["old"])


# ----------------------------------------------------------------------------- engine errors


class BrokenOnce:
    """An executor that raises on its first plan (an engine bug), then works."""

    def __init__(self) -> None:
        self.inner = FakeEngine()
        self.calls = 0

    def submit(self, plan: P.CyclePlan) -> Future[P.CycleResult]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.inner.submit(plan)


def test_engine_exception_fails_the_cycle_clearly_and_the_clock_keeps_serving(store) -> None:
    make_run(store, "r1")
    create = _id(store, "r1", 0)
    first = submit(store, "r1", 1)
    notified: list[str] = []
    counter = iter(range(1, 100))
    ex = BrokenOnce()
    loop = ClockLoop(base_model=MODEL, store=store, executor=ex, period=0,
                     notify=notified.extend, cycle_ids=lambda: next(counter))
    loop.start()
    try:
        deadline = time.monotonic() + 10
        # The clock records results first and notifies the long-polls after: wait for both.
        while ((store.get_request(first).status != FAILED or first not in notified)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        for rid in (create, first):
            row = store.get_request(rid)
            assert row.status == FAILED and row.error_category == "server"
            assert row.error.startswith("engine error: ") and "illegal memory" in row.error
        assert {create, first} <= set(notified)
        # The server keeps serving: a new run trains in the next cycle.
        make_run(store, "r2")
        later = submit(store, "r2", 1)
        loop.wake()
        while store.get_request(later).status != COMPLETED and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.get_request(later).status == COMPLETED
    finally:
        loop.stop()


def test_background_recovery_rebuilds_after_start_and_on_demand(store, tmp_path) -> None:
    """recover(background=True) returns before any rebuild (the server answers at once);
    a run's first claimed request rebuilds it then (same state as an eager recovery), and
    the clock rebuilds the others one at a time between cycles."""
    for run in ("r1", "r2"):
        make_run(store, run)
    state = tmp_path / "state"
    loop1 = clock(store, FakeEngine(), state, steps=0)
    assert loop1.run_cycle() is not None  # both creates
    seq = train(store, loop1, "r1", 1, 3)
    train(store, loop1, "r2", 1, 2)

    eng = FakeEngine()
    loop2 = clock(store, eng, state, steps=0)
    assert loop2.recover(background=True) == ["r1", "r2"]
    assert eng.plans == []  # nothing rebuilt yet
    train(store, loop2, "r1", seq, 1)  # r1's request: r1 rebuilt first, in that cycle
    assert "r2" not in eng.runs and eng.runs["r1"] == pytest.approx(reference(4))
    loop2._restore_next_pending()  # what the clock thread does between cycles
    assert set(eng.runs) == {"r1", "r2"} and not loop2._pending_restore
    assert eng.runs["r2"]["steps"] == 2


def test_stop_snapshots_unsaved_runs_so_a_restart_replays_nothing(store, tmp_path) -> None:
    make_run(store, "r1")
    state = tmp_path / "state"
    loop1 = clock(store, FakeEngine(), state, steps=50)  # no periodic snapshot in 3 steps
    loop1.start()
    deadline = time.monotonic() + 60
    while store.get_run("r1").next_seq == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    loop1.stop()  # the create ran; stop it and drive cycles by hand
    train(store, loop1, "r1", 1, 3)
    assert store.get_run("r1").snapshot_dir is None
    loop1.stop()  # a clean shutdown (SIGTERM)
    run = store.get_run("r1")
    assert run.snapshot_seq == 6 and Path(run.snapshot_dir).is_dir()
    eng = FakeEngine()
    assert clock(store, eng, state, steps=50).recover() == ["r1"]
    kinds = [s.kind if not isinstance(s, P.PassGroup) else "fbs" for s in eng.plans[0].steps]
    assert kinds == ["create", "load"]  # nothing replayed
    assert eng.runs["r1"] == pytest.approx(reference(3))


def test_absolute_paths_of_an_older_server_are_made_data_dir_relative(store) -> None:
    """Rows an older server wrote with absolute directories (its own data dir) are rewritten
    relative, so a copied data dir reads its own files; the payload's hash follows, so an
    SDK retry of the same request still matches."""
    from bios.server.store import CheckpointRow, payload_digest

    make_run(store, "r1")
    old = "/srv/old-bios"
    store.add_checkpoint(CheckpointRow(
        run_id="r1", owner="local", kind="training", name="a",
        directory=f"{old}/checkpoints/r1/weights/a", base_model=MODEL, size_bytes=1,
        created_at=time.time()))
    store.set_snapshot("r1", f"{old}/state/r1/seq-0000000002-abcd", 2)
    load = store.submit(owner="local", run_id="r1", seq_id=1, kind="load_weights",
                        base_model=MODEL, payload={**OPT, "directory":
                                                   f"{old}/checkpoints/r1/weights/a"})
    assert store.relativize_paths() == 3
    assert store.get_checkpoint("r1", "training", "a").directory == "checkpoints/r1/weights/a"
    assert store.get_run("r1").snapshot_dir == "state/r1/seq-0000000002-abcd"
    row = store.get_request(load)
    assert json.loads(row.payload)["directory"] == "checkpoints/r1/weights/a"
    assert row.payload_hash == payload_digest(json.loads(row.payload))
    assert store.relativize_paths() == 0  # idempotent
