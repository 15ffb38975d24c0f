"""Fair, bounded cycles without torch: the fair-share selection, carry-over in seq order,
requests split across cycles (and their crash recovery), per-tenant queued tokens, and the
least-recently-used bound on resident runs. A `FakeEngine` (test_recovery) stands in for the
real one; the real engine's split == one pass is in tests/engine/test_engine.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_recovery import OPT, FakeEngine
from test_scheduler import MODEL

from bios.server import plan as P
from bios.server.scheduler import ClockLoop, FairShare, Take, select_fair
from bios.server.store import (
    COMPLETED,
    QUEUED,
    Pending,
    QueueFullError,
    RequestRow,
    RunRow,
    Store,
)

# ----------------------------------------------------------------------------- selection


def pending(run: str, owner: str, tokens: list[int]) -> list[Pending]:
    return [Pending(f"{run}-{i}", run, owner, i + 1, "forward_backward" if t else "optim_step",
                    t) for i, t in enumerate(tokens)]


def test_a_backlogged_tenant_gets_its_share_and_the_other_all_it_asks() -> None:
    """B asks for 200 tokens, A for 20 runs x 10 x 100: B gets all of it, A the rest of the
    budget spread over its runs, and the cycle stays within the budget."""
    queues = {f"a{i}": pending(f"a{i}", "A", [100] * 10) for i in range(20)}
    queues["b"] = pending("b", "B", [100, 0, 100])
    owners = {run: rows[0].owner for run, rows in queues.items()}
    takes = select_fair(queues, owners, 1000, 512, FairShare())
    assert takes["b"] == Take(3)  # its fb, its optim_step (free), its next fb
    a = {run: t.count for run, t in takes.items() if run.startswith("a")}
    assert sum(a.values()) == 8 and set(a.values()) == {1}  # 800 tokens, one run each
    tokens = sum(sum(p.tokens for p in queues[r][:t.count]) for r, t in takes.items())
    assert tokens <= 1000


def test_free_ops_are_taken_even_when_the_budget_is_spent() -> None:
    """An optim_step at a run's head costs no tokens: a flood of passes cannot starve it."""
    queues = {"a": pending("a", "A", [1000] * 3), "b": pending("b", "B", [0, 0, 600])}
    takes = select_fair(queues, {"a": "A", "b": "B"}, 1000, 4096, FairShare())
    assert takes["b"].count >= 2  # both optim_steps, whatever the passes left


def test_a_request_larger_than_the_split_size_is_split_and_blocks_the_runs_later_ops() -> None:
    queues = {"a": pending("a", "A", [5000, 0, 10])}
    takes = select_fair(queues, {"a": "A"}, 1000, 512, FairShare())
    assert takes == {"a": Take(0, partial=1000)}
    # The same request in progress (a head of 4000 tokens left), with the rest behind it.
    takes = select_fair({"a": pending("a", "A", [0, 10])}, {"a": "A"}, 1000, 512,
                        FairShare(), heads={"a": (4000, 100)})
    assert takes == {"a": Take(0, partial=1000)}
    # Its last part fits: the run goes on with the free op and the next request.
    takes = select_fair({"a": pending("a", "A", [0, 10])}, {"a": "A"}, 1000, 512,
                        FairShare(), heads={"a": (900, 100)})
    assert takes == {"a": Take(3)}


def test_a_split_part_whose_datum_does_not_fit_waits_unless_it_is_the_first_pick() -> None:
    """A part is whole datums: with 300 tokens left, a request of 1000-token datums does not
    take a part that would overrun the cycle, unless nothing else is in it."""
    big = [Pending("a-1", "a", "A", 1, "forward_backward", 5000, 1000)]
    queues = {"a": big, "b": pending("b", "B", [700])}
    owners = {"a": "A", "b": "B"}
    fair = FairShare(credit={"A": -500.0})  # B picks first
    assert select_fair(queues, owners, 1000, 512, fair) == {"b": Take(1)}
    assert select_fair({"a": big}, owners, 1000, 512, FairShare()) == {"a": Take(0, 1000)}


def test_deficit_round_robin_alternates_requests_that_do_not_both_fit() -> None:
    """Two backlogged tenants whose 600-token requests cannot share a 1000-token cycle: the
    credit carried between cycles makes them take turns."""
    fair = FairShare()
    wins = {"A": 0, "B": 0}
    for _ in range(10):
        queues = {"a": pending("a", "A", [600] * 5), "b": pending("b", "B", [600] * 5)}
        takes = select_fair(queues, {"a": "A", "b": "B"}, 1000, 4096, fair)
        assert sum(t.count for t in takes.values()) == 1
        wins["A" if "a" in takes else "B"] += 1
    assert wins == {"A": 5, "B": 5}


# ----------------------------------------------------------------------------- the clock


class OutputEngine(FakeEngine):
    """FakeEngine whose forward_backward answers per-datum outputs (the datum's token sum)
    and reports the tokens it ran, like the real engine's result."""

    def submit(self, plan):  # type: ignore[override]
        f = super().submit(plan)
        res: P.CycleResult = f.result()
        ops = {op.request_id: op for s in plan.steps
               for op in (s.ops if isinstance(s, P.PassGroup) else [s])}
        out = []
        tokens = 0
        for r in res.results:
            op = ops[r.request_id]
            if isinstance(op, P.ForwardBackwardOp) and r.ok:
                tokens += op.num_tokens
                body = {"loss_fn_outputs": [{"logprobs": {"data": [float(sum(d.tokens))]}}
                                            for d in op.data],
                        "metrics": {"loss:sum": float(op.num_tokens), "loss:mean": 1.0}}
                r = P.OpResult(r.request_id, True, body, loss_tokens=op.num_tokens)
            out.append(r)
        f2 = type(f)()
        f2.set_result(P.CycleResult(res.cycle_id, out, P.CycleStats(runs=1, tokens=tokens)))
        return f2


def tenant_run(store: Store, run_id: str, owner: str, rank: int = 4) -> None:
    now = time.time()
    store.create_run(RunRow(id=run_id, session_id="s", owner=owner, base_model=MODEL,
                            canonical_model=MODEL, rank=rank, seed=1, alpha=32.0, train_attn=True,
                            train_mlp=True, train_unembed=False, user_metadata="{}",
                            created_at=now, last_request_time=now, next_seq=0),
                     {"wire": {"run": run_id}})


def fb(store: Store, run: str, owner: str, seq: int, datums: list[list[int]]) -> str:
    data = [{"model_input": {"chunks": [{"tokens": d, "type": "encoded_text"}]},
             "loss_fn_inputs": {"target_tokens": {"data": d, "dtype": "int64"}}} for d in datums]
    payload = {"owner": owner, "base_model_name": MODEL,
               "wire": {"forward_backward_input": {"data": data, "loss_fn": "cross_entropy"}}}
    return store.submit(owner=owner, run_id=run, seq_id=seq, kind="forward_backward",
                        base_model=MODEL, payload=payload, tokens=sum(map(len, datums)))


def optim(store: Store, run: str, owner: str, seq: int) -> str:
    return store.submit(owner=owner, run_id=run, seq_id=seq, kind="optim_step",
                        base_model=MODEL, payload={**OPT, "owner": owner})


def bounded_clock(store: Store, eng: FakeEngine, state: Path | None = None,
                  cycle_tokens: int = 300, split_tokens: int = 200, **kw) -> ClockLoop:
    counter = iter(range(store.next_cycle_id(), 1_000_000))
    return ClockLoop(base_model=MODEL, store=store, executor=eng, period=0,
                     notify=lambda ids: None, cycle_ids=lambda: next(counter),
                     state_dir=state, snapshot_steps=1000, snapshot_seconds=3600,
                     cycle_tokens=cycle_tokens, split_tokens=split_tokens, **kw)


def request(store: Store, rid: str) -> RequestRow:
    row = store.get_request(rid)
    assert row is not None
    return row


def drain(loop: ClockLoop, limit: int = 100) -> int:
    n = 0
    while loop.run_cycle() is not None:
        n += 1
        assert n < limit
    return n


def test_cycles_are_bounded_carry_over_in_order_and_a_small_tenant_is_not_stalled(
        store: Store) -> None:
    tenant_run(store, "a1", "A")
    tenant_run(store, "a2", "A")
    tenant_run(store, "b", "B")
    eng = OutputEngine()
    loop = bounded_clock(store, eng)
    assert loop.run_cycle() is not None  # the creates
    flood = [fb(store, run, "A", seq, [[seq % 7, 2] * 25]) for seq in range(1, 21)
             for run in ("a1", "a2")]  # 40 requests of 50 tokens
    small = fb(store, "b", "B", 1, [[1, 2, 3]])
    step = optim(store, "b", "B", 2)
    loop.run_cycle()
    # B's work ran in the first cycle while most of A's backlog still waits.
    assert request(store, small).status == COMPLETED and request(store, step).status == COMPLETED
    assert sum(request(store, r).status == QUEUED for r in flood) >= 30
    drain(loop)
    cycles: dict[str, list[int]] = {"a1": [], "a2": []}
    for i, rid in enumerate(flood):
        row = request(store, rid)
        assert row.status == COMPLETED
        cycles[("a1", "a2")[i % 2]].append(int(row.cycle_id or 0))
    for run_cycles in cycles.values():  # each run's requests ran in seq order
        assert run_cycles == sorted(run_cycles)
    tokens = [sum(op.num_tokens for s in plan.steps if isinstance(s, P.PassGroup)
                  for op in s.ops) for plan in eng.plans]
    assert max(tokens) <= 300 and len(eng.plans) >= 7
    # Both of A's runs got an even share of each cycle.
    assert abs(len(set(cycles["a1"])) - len(set(cycles["a2"]))) <= 1


def test_a_split_request_runs_in_parts_and_equals_the_one_pass_result(store: Store) -> None:
    datums = [[d, 1, 2, 3, 4] * 20 for d in range(9)]  # 9 datums of 100 tokens
    tenant_run(store, "split", "A")
    tenant_run(store, "whole", "A")
    tenant_run(store, "b", "B")
    eng = OutputEngine()
    loop = bounded_clock(store, eng)
    loop.run_cycle()
    big = fb(store, "split", "A", 1, datums)
    after = optim(store, "split", "A", 2)
    small = fb(store, "b", "B", 1, [[5, 6]])
    loop.run_cycle()
    assert request(store, small).status == COMPLETED  # not behind the big request
    assert request(store, big).status == "running" and request(store, after).status == QUEUED
    assert loop.last_cycle is not None and loop.last_cycle.split == 1
    drain(loop)
    parts = [op for plan in eng.plans for s in plan.steps if isinstance(s, P.PassGroup)
             for op in s.ops if op.request_id.startswith(big)]
    assert len(parts) >= 3 and [len(op.data) for op in parts] != [9]
    assert [d.tokens for op in parts for d in op.data] == datums  # in order, each once
    # The one-pass reference on an unbounded clock, same seed and data.
    ref = bounded_clock(store, eng, cycle_tokens=0)
    whole = fb(store, "whole", "A", 1, datums)
    optim(store, "whole", "A", 2)
    drain(ref)
    split_row, whole_row = request(store, big), request(store, whole)
    assert split_row.status == COMPLETED and request(store, after).status == COMPLETED
    # Per-datum outputs and loss sums
    assert json.loads(split_row.result or "") == json.loads(whole_row.result or "")
    assert eng.runs["split"] == eng.runs["whole"]  # gradients accumulated, one step each


def test_a_half_done_split_request_is_replayed_whole_exactly_once(store: Store,
                                                                   tmp_path: Path) -> None:
    datums = [[d, 3] * 50 for d in range(8)]
    tenant_run(store, "r", "A")
    state = tmp_path / "state"
    eng1 = OutputEngine()
    loop1 = bounded_clock(store, eng1, state)
    loop1.run_cycle()
    fb(store, "r", "A", 1, [[1, 2]])
    optim(store, "r", "A", 2)
    loop1.run_cycle()
    big = fb(store, "r", "A", 3, datums)
    optim(store, "r", "A", 4)
    loop1.run_cycle()
    loop1.run_cycle()  # two parts ran; the server dies here
    assert request(store, big).status == "running" and eng1.runs["r"]["g"] != 0

    eng2 = OutputEngine()  # the restarted server
    loop2 = bounded_clock(store, eng2, state)
    assert loop2.recover() == ["r"]
    assert request(store, big).status == QUEUED
    drain(loop2)
    assert request(store, big).status == COMPLETED
    # The reference: the same requests on a server that never stopped.
    tenant_run(store, "ref", "A")
    eng3 = OutputEngine()
    loop3 = bounded_clock(store, eng3)
    loop3.run_cycle()
    fb(store, "ref", "A", 1, [[1, 2]])
    optim(store, "ref", "A", 2)
    fb(store, "ref", "A", 3, datums)
    optim(store, "ref", "A", 4)
    drain(loop3)
    assert eng2.runs["r"] == eng3.runs["ref"]
    assert eng2.runs["r"]["steps"] == 2


def test_queued_tokens_per_tenant_are_bounded(store: Store) -> None:
    tenant_run(store, "a", "A")
    tenant_run(store, "b", "B")
    fb(store, "a", "A", 1, [[1] * 60])
    store.submit(owner="A", run_id="a", seq_id=2, kind="forward_backward", base_model=MODEL,
                 payload={"x": 2}, tokens=30, max_queued_tokens_per_tenant=100)
    with pytest.raises(QueueFullError) as e:
        store.submit(owner="A", run_id="a", seq_id=3, kind="forward_backward",
                     base_model=MODEL, payload={"x": 3}, tokens=20,
                     max_queued_tokens_per_tenant=100)
    assert e.value.unit == "tokens" and e.value.queued == 90 and e.value.limit == 100
    assert e.value.flag == "--max-queued-tokens-per-tenant"
    # Another tenant is not affected, and a free op of A still gets in.
    store.submit(owner="B", run_id="b", seq_id=1, kind="forward_backward", base_model=MODEL,
                 payload={"x": 1}, tokens=80, max_queued_tokens_per_tenant=100)
    store.submit(owner="A", run_id="a", seq_id=3, kind="optim_step", base_model=MODEL,
                 payload=OPT, max_queued_tokens_per_tenant=100)


def test_resident_runs_are_bounded_by_evicting_the_least_recently_used(
        store: Store, tmp_path: Path) -> None:
    """At most 2 runs resident (1 per tenant for A): a run that needs the engine unloads
    the least recently used idle one (after a snapshot), which reloads on its next request
    with the state it had. A run holding gradients is never evicted."""
    for run, owner in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")):
        tenant_run(store, run, owner)
    eng = OutputEngine()
    loop = bounded_clock(store, eng, tmp_path / "state", cycle_tokens=0,
                         max_resident_runs=3, max_resident_runs_per_tenant=1)
    seqs = dict.fromkeys(("a1", "a2", "b1", "b2"), 1)

    def step(run: str, owner: str) -> None:
        fb(store, run, owner, seqs[run], [[seqs[run], 2]])
        optim(store, run, owner, seqs[run] + 1)
        seqs[run] += 2
        drain(loop)

    loop.run_cycle()  # creates all four (over the bound until they can leave)
    step("a1", "A")
    assert "a2" not in eng.runs and "a1" in eng.runs  # A keeps one resident run
    state_a1 = dict(eng.runs["a1"])
    step("a2", "A")
    assert "a1" not in eng.runs and "a2" in eng.runs
    step("b1", "B")
    assert "b2" not in eng.runs
    # a1 comes back from its snapshot with the state it left with, then trains on.
    fb(store, "a1", "A", seqs["a1"], [[9, 9]])
    seqs["a1"] += 1
    drain(loop)
    assert eng.runs["a1"]["w"] == state_a1["w"] and eng.runs["a1"]["g"] != 0
    # a1 now holds gradients: a2 cannot evict it, so A is over its bound until it steps.
    step("a2", "A")
    assert "a1" in eng.runs and "a2" in eng.runs
    optim(store, "a1", "A", seqs["a1"])
    drain(loop)
    assert len(eng.runs) <= 3


def test_the_time_bound_follows_the_measured_throughput_and_overhead(store: Store) -> None:
    loop = bounded_clock(store, FakeEngine(), cycle_tokens=10_000, cycle_seconds=0.5)
    assert loop.cycle_budget() == 200  # nothing measured yet: one pass (split_tokens)
    loop._tokens_per_s, loop._overhead_s = 4000.0, 0.01
    assert loop.cycle_budget() == 2000  # 0.5 s of engine time
    loop._overhead_s = 0.1  # the clock's own work: keep it under a tenth of a cycle
    assert loop.cycle_budget() == 3600
    loop._tokens_per_s = 10.0
    assert loop.cycle_budget() == loop.min_cycle_tokens
    assert bounded_clock(store, FakeEngine(), cycle_tokens=0).cycle_budget() == 0


def test_runs_holding_gradients_are_counted_against_the_tenants_resident_bound(
        store: Store, tmp_path: Path) -> None:
    tenant_run(store, "a1", "A")
    tenant_run(store, "a2", "A")
    tenant_run(store, "b1", "B")
    loop = bounded_clock(store, OutputEngine(), tmp_path / "state", cycle_tokens=0)
    loop.run_cycle()
    for run, owner in (("a1", "A"), ("a2", "A"), ("b1", "B")):
        fb(store, run, owner, 1, [[1, 2]])
    drain(loop)
    assert loop.pinned_runs("A") == 2 and loop.pinned_runs("B") == 1
    optim(store, "a1", "A", 2)
    drain(loop)
    assert loop.pinned_runs("A") == 1


DIMS = P.ModelDims(hidden_size=8, intermediate_size=16, num_layers=2, q_dim=8, kv_dim=4,
                   vocab_size=32)


def test_resident_bytes_are_bounded_by_evicting_the_least_recently_used(
        store: Store, tmp_path: Path) -> None:
    """A bound by bytes (adapter fp32 weights + AdamW state, from each run's rank and the
    model's dims) beside the bound by count: a rank-8 run weighs two rank-4 runs, so with room
    for four rank-4 runs, a1, a2 (rank 4) and b (rank 8) fit, and c (rank 4) unloads the least
    recently used one; per tenant, B's second run unloads its first."""
    unit = P.resident_bytes(DIMS, P.AdapterSpec(rank=4, seed=1, train_unembed=False))
    # attn (8+8)+2(8+4)+(8+8) + mlp 3(8+16) per layer, 2 layers, x rank 4, 12 bytes each
    assert unit == 12 * 4 * 2 * (56 + 72)
    for run, owner, rank in (("a1", "A", 4), ("a2", "A", 4), ("b", "B", 8), ("c", "C", 4),
                             ("b2", "B", 4)):
        tenant_run(store, run, owner, rank)
    eng = OutputEngine()
    loop = bounded_clock(store, eng, tmp_path / "state", cycle_tokens=0, model_dims=DIMS,
                         max_resident_bytes=4 * unit, max_resident_bytes_per_tenant=2 * unit)
    assert loop.run_bytes("b") == 2 * unit and loop.run_bytes("a1") == unit
    seqs = dict.fromkeys(("a1", "a2", "b", "c", "b2"), 1)

    def step(run: str, owner: str) -> None:
        fb(store, run, owner, seqs[run], [[seqs[run], 2]])
        optim(store, run, owner, seqs[run] + 1)
        seqs[run] += 2
        drain(loop)

    loop.run_cycle()  # creates all five (over the bound until they can leave)
    for run, owner in (("a1", "A"), ("a2", "A"), ("b", "B")):
        step(run, owner)
    assert sum(loop.run_bytes(r) for r in eng.runs) <= 4 * unit
    step("a1", "A")
    step("c", "C")  # a2 is the least recently used: it leaves, b stays
    assert "c" in eng.runs and "a2" not in eng.runs and "b" in eng.runs
    assert sum(loop.run_bytes(r) for r in eng.runs) <= 4 * unit
    a1_two_steps = dict(eng.runs["a1"])  # a1 after the two steps a2 will have taken
    step("a2", "A")  # a2 reloads from its snapshot; b is now the least recently used
    assert "a2" in eng.runs and "b" not in eng.runs
    assert sum(loop.run_bytes(r) for r in eng.runs) <= 4 * unit
    assert eng.runs["a2"]["w"] == a1_two_steps["w"]  # same seed, same data: reloaded intact


def test_resident_bytes_per_tenant_evict_the_tenants_own_runs(
        store: Store, tmp_path: Path) -> None:
    """Only a per-tenant bytes bound (2 units): tenant P's runs (rank 4 and rank 8: 3 units)
    cannot both stay, whatever the other tenant does; Q's run stays although it is the
    least recently used."""
    unit = P.resident_bytes(DIMS, P.AdapterSpec(rank=4, seed=1, train_unembed=False))
    for run, owner, rank in (("p1", "P", 4), ("p2", "P", 8), ("q", "Q", 4)):
        tenant_run(store, run, owner, rank)
    eng = OutputEngine()
    loop = bounded_clock(store, eng, tmp_path / "state", cycle_tokens=0, model_dims=DIMS,
                         max_resident_bytes_per_tenant=2 * unit)
    loop.run_cycle()
    seqs = dict.fromkeys(("p1", "p2", "q"), 1)

    def step(run: str, owner: str) -> None:
        fb(store, run, owner, seqs[run], [[seqs[run], 2]])
        optim(store, run, owner, seqs[run] + 1)
        seqs[run] += 2
        drain(loop)

    step("q", "Q")  # P holds 3 units: its least recently used run leaves
    assert "q" in eng.runs and "p1" not in eng.runs and "p2" in eng.runs
    step("p1", "P")  # p1 back: p2 leaves, not q (the least recently used overall)
    assert "p1" in eng.runs and "p2" not in eng.runs and "q" in eng.runs
