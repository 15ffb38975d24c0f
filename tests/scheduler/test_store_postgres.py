"""The store's behaviours on PostgreSQL (a throwaway cluster started by the fixture).

The store tests shared with SQLite run on both backends through conftest's `store` (see
test_scheduler.py); these are the ones specific to PostgreSQL or to concurrency. Skipped only
when the PostgreSQL server binaries are not installed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for postgres_server

from test_scheduler import MODEL, claim_seqs, fb_payload, make_run, submit

from bios.server.store import (
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    CheckpointRow,
    QueueFullError,
    RequestRow,
    RunRow,
    SamplerRow,
    SeqConflictError,
    Store,
)
from postgres_server import PostgresServer, find_bindir
from store_fixture import open_store

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(find_bindir() is None,
                       reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed"),
]


@pytest.fixture
def store(pg: PostgresServer) -> Iterator[Store]:
    """PostgreSQL only (conftest's `store` also runs the shared tests on SQLite)."""
    s = open_store(pg.url)
    yield s
    s.close()


def sample(store: Store, sampler: str, seq: int, prompt: int = 0) -> str:
    return store.submit(owner="local", run_id=None, sampler_id=sampler, seq_id=seq,
                        kind="sample", base_model=MODEL, payload={"prompt": [prompt, seq]})


# ----------------------------------------------------------------------------- runs, submit


def test_dialect_is_postgresql(store: Store) -> None:
    assert store.engine.dialect.name == "postgresql"


def test_create_run_is_idempotent_and_conflict_detected(store: Store) -> None:
    def run_row(rank: int) -> RunRow:
        now = time.time()
        return RunRow(id="r1", session_id="s", owner="local", base_model=MODEL,
                      canonical_model=MODEL, rank=rank, seed=0, alpha=32.0, train_attn=True,
                      train_mlp=True, train_unembed=False, user_metadata="{}", created_at=now,
                      last_request_time=now, next_seq=0)

    rid = store.create_run(run_row(4), {"wire": {"run": "r1"}})
    assert store.create_run(run_row(4), {"wire": {"run": "r1"}}) == rid  # a retried create
    with pytest.raises(SeqConflictError):
        store.create_run(run_row(8), {"wire": {"run": "different"}})
    run = store.get_run("r1")
    assert run is not None and run.next_seq == 0 and run.rank == 4 and run.lost_reason is None
    assert run.train_attn is True and run.train_unembed is False
    req = store.get_request(rid)
    assert req is not None and req.kind == "create" and req.seq_id == 0 and req.status == QUEUED
    runs, total = store.list_runs("local", limit=10, offset=0)
    assert total == 1 and [r.id for r in runs] == ["r1"]


def test_queue_limits(store: Store) -> None:
    make_run(store, "r1")
    submit(store, "r1", 1)
    with pytest.raises(QueueFullError) as e:
        store.submit(owner="local", run_id="r1", seq_id=2, kind="forward_backward",
                     base_model=MODEL, payload=fb_payload([2]), max_queued_per_run=2)
    assert e.value.queued == 2 and e.value.limit == 2
    with pytest.raises(QueueFullError):
        store.submit(owner="local", run_id="r1", seq_id=2, kind="forward_backward",
                     base_model=MODEL, payload=fb_payload([2]), max_queued_total=1)


def test_queue_limit_holds_under_concurrent_submits(store: Store) -> None:
    """16 threads submit at once against a tenant limit of 5: exactly 5 get in (the count and
    the insert are one admission step, so a burst cannot overshoot)."""
    for i in range(16):
        make_run(store, f"b{i}")
    start = threading.Barrier(16)

    def one(i: int) -> bool:
        start.wait()
        try:
            store.submit(owner="local", run_id=f"b{i}", seq_id=1, kind="forward_backward",
                         base_model=MODEL, payload=fb_payload([i]), max_queued_per_tenant=21)
        except QueueFullError:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:  # the 16 creations are queued too: 21 - 16 = 5 left
        accepted = sum(pool.map(one, range(16)))
    assert accepted == 5
    with store.tx() as s:
        queued = s.execute(select(func.count()).select_from(RequestRow)
                           .where(RequestRow.status == QUEUED)).scalar_one()
    assert queued == 21


# ----------------------------------------------------------------------------- claiming


def test_claim_interleaves_runs_in_their_own_order(store: Store) -> None:
    make_run(store, "r1")
    make_run(store, "r2")
    for seq in (2, 1):
        submit(store, "r2", seq)
        submit(store, "r1", seq)
    assert claim_seqs(store) == [("r1", 0), ("r1", 1), ("r1", 2),
                                 ("r2", 0), ("r2", 1), ("r2", 2)]


def test_claim_samples_oldest_first_with_limit(store: Store) -> None:
    store.add_sampler(SamplerRow(id="smp", session_id="s", owner="local", base_model=MODEL,
                                 canonical_model=MODEL, model_path=None, checkpoint_dir=None,
                                 created_at=time.time()))
    ids = [sample(store, "smp", seq) for seq in range(3)]
    assert sample(store, "smp", 1) == ids[1]  # idempotent retry
    with pytest.raises(SeqConflictError):
        sample(store, "smp", 1, prompt=7)
    assert store.has_queued_samples(MODEL)
    assert not store.has_queued(MODEL)  # sample requests are not run-scoped
    first = store.claim_samples(MODEL, limit=2)
    assert [c.id for c in first] == ids[:2] and first[0].payload == {"prompt": [0, 0]}
    assert [c.id for c in store.claim_samples(MODEL, limit=2)] == ids[2:]
    assert store.claim_samples(MODEL, limit=2) == []
    assert store.get_request(ids[0]).status == RUNNING


def test_finish_records_results_and_errors(store: Store) -> None:
    make_run(store, "r1")
    ok = submit(store, "r1", 1)
    bad = submit(store, "r1", 2)
    store.claim_cycle(MODEL, cutoff=time.time())
    store.finish(ok, result={"metrics": {"loss": 1.5}}, cycle_id=7)
    store.finish(bad, error="boom", category="user", cycle_id=7)
    row = store.get_request(ok)
    assert row.status == COMPLETED and row.result == '{"metrics": {"loss": 1.5}}'
    assert row.cycle_id == 7 and row.completed_at is not None and row.started_at is not None
    row = store.get_request(bad)
    assert row.status == FAILED and row.error == "boom" and row.error_category == "user"


# ----------------------------------------------------------------------------- other state


def test_checkpoints_add_replace_list_delete(store: Store) -> None:
    def ckpt(name: str, size: int = 10, ephemeral: bool = False) -> CheckpointRow:
        return CheckpointRow(run_id="r1", owner="local", kind="training", name=name,
                             directory=f"/ck/{name}", base_model=MODEL, size_bytes=size,
                             public=False, ephemeral=ephemeral, created_at=time.time())

    store.add_checkpoint(ckpt("a"))
    store.add_checkpoint(ckpt("b", size=5 * 2**30))  # > 2 GiB must fit
    store.add_checkpoint(ckpt("tmp", ephemeral=True))
    store.add_checkpoint(ckpt("a", size=20))  # same name replaces
    listed = store.list_checkpoints("r1")
    assert sorted((c.name, c.size_bytes) for c in listed) == [("a", 20), ("b", 5 * 2**30)]
    assert store.get_checkpoint("r1", "training", "tmp") is not None
    b = store.get_checkpoint("r1", "training", "b")
    store.delete_checkpoint(b.id)
    store.delete_checkpoint(b.id)  # deleting twice is harmless
    assert [c.name for c in store.list_checkpoints("r1")] == ["a"]


def test_samplers_add_is_idempotent(store: Store) -> None:
    row = dict(id="smp", session_id="s", owner="local", base_model=MODEL,
               canonical_model=MODEL, model_path="/m", checkpoint_dir=None)
    store.add_sampler(SamplerRow(**row, created_at=1.0))
    store.add_sampler(SamplerRow(**{**row, "model_path": "/other"}, created_at=2.0))
    got = store.get_sampler("smp")
    assert got is not None and got.model_path == "/m" and got.created_at == 1.0
    assert store.get_sampler("nope") is None


def test_record_cycle_and_next_cycle_id(store: Store) -> None:
    assert store.next_cycle_id() == 1
    assert store.record_cycle(MODEL, time.time(), 1.0, 2.0, 1, 3, 100, 2) == 1
    assert store.record_cycle(MODEL, time.time(), 1.0, 2.0, 1, 3, 100, 2) == 2
    assert store.next_cycle_id() == 3


def test_sessions_and_heartbeat(store: Store) -> None:
    sid = store.create_session("alice", ["t"], {"k": "v"})
    before = store.get_session(sid).last_heartbeat
    time.sleep(0.01)
    store.heartbeat(sid)
    assert store.get_session(sid).last_heartbeat > before


def test_restart_recovery_requeues_running_and_lists_replay(store: Store) -> None:
    make_run(store, "r1")
    make_run(store, "r2")
    claim_seqs(store)  # both creates run
    for run in ("r1", "r2"):
        with store.tx() as tx:
            tx.execute(update(RequestRow).where(RequestRow.run_id == run)
                       .values(status=COMPLETED))
    done = submit(store, "r1", 1)
    running = submit(store, "r1", 2)
    claim_seqs(store)
    store.finish(done, result={})
    queued = submit(store, "r2", 1)
    recs = {r.run.id: r for r in store.prepare_recovery(MODEL)}
    assert [q.id for q in recs["r1"].replay] == [done] and recs["r1"].requeued == 1
    assert recs["r2"].replay == [] and recs["r2"].requeued == 0
    assert store.get_request(running).status == QUEUED
    assert store.get_run("r1").next_seq == 2
    store.set_snapshot("r1", "/state/r1/seq-1", 1)
    assert store.prepare_recovery(MODEL)[0].replay == []
    assert store.mark_run_lost("r2", "gone") == 1
    row = store.get_request(queued)
    assert row.status == FAILED and row.error == "gone" and row.error_category == "server"
    assert store.get_run("r2").lost_reason == "gone"
    assert [r.run.id for r in store.prepare_recovery(MODEL)] == ["r1"]


def test_old_schema_gets_new_nullable_columns(store: Store, pg: PostgresServer) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE training_runs DROP COLUMN snapshot_dir"))
        conn.execute(text("ALTER TABLE training_runs DROP COLUMN snapshot_seq"))
    again = Store(pg.url)  # a newer server on an older database adds them
    make_run(again, "r1")
    again.set_snapshot("r1", "/x", 3)
    assert again.get_run("r1").snapshot_seq == 3
    again.close()


# ----------------------------------------------------------------------------- concurrency


def _in_threads(n: int, fn) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            barrier.wait()
            fn(i)
        except BaseException as e:  # collected and asserted on by the caller
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return errors


def test_concurrent_submits_to_one_run_are_claimed_in_seq_order(store: Store) -> None:
    make_run(store, "r1")
    threads, per_thread = 8, 8
    total = threads * per_thread

    def work(i: int) -> None:  # thread i submits seqs i+1, i+1+threads, ... (interleaved)
        for seq in range(i + 1, total + 1, threads):
            submit(store, "r1", seq)

    assert _in_threads(threads, work) == []
    claimed = store.claim_cycle(MODEL, cutoff=time.time())
    assert [c.seq_id for c in claimed] == list(range(total + 1))
    assert store.get_run("r1").next_seq == total + 1


def test_concurrent_identical_retries_return_one_request(store: Store) -> None:
    """Retries racing for one empty slot: the losers get the winner's id, not an error."""
    for round_ in range(10):  # a single round often misses the race
        run = f"r{round_}"
        make_run(store, run)
        ids: list[str] = []

        def work(_: int, run: str = run, ids: list[str] = ids) -> None:
            ids.append(submit(store, run, 1))

        assert _in_threads(8, work) == []
        assert len(ids) == 8 and len(set(ids)) == 1
    claimed = claim_seqs(store)
    assert claimed == [(f"r{i}", seq) for i in range(10) for seq in (0, 1)]


def test_concurrent_conflicting_submits_raise_seq_conflict(store: Store) -> None:
    make_run(store, "r1")
    ids: list[str] = []

    def work(i: int) -> None:
        ids.append(submit(store, "r1", 1, payload=fb_payload([i])))

    errors = _in_threads(8, work)
    assert len(ids) == 1 and len(errors) == 7
    assert all(isinstance(e, SeqConflictError) for e in errors)
