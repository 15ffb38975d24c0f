"""`bios trace`'s trace builder on a made-up run history (no server): every span opens and
closes, categories follow request kinds, times are microseconds from the run's start, and
missed cycles are instant events."""

from __future__ import annotations

from pytest import approx

from bios import types
from bios.console_cli import trace_events

T0 = 1_700_000_000.0


def record(seq: int, kind: str, created: float, started: float | None, done: float | None,
           **kw) -> types.RunRequestRecord:
    return types.RunRequestRecord(seq_id=seq, kind=kind, status="completed" if done else
                                  "queued", created_at=T0 + created,
                                  started_at=None if started is None else T0 + started,
                                  completed_at=None if done is None else T0 + done, **kw)


def test_trace_events_of_a_small_run() -> None:
    run = types.TrainingRun(training_run_id="s:train:0", base_model="bios/tiny-llama")
    history = types.RunHistory(training_run_id=run.training_run_id, requests=[
        record(0, "create", 0.0, 0.1, 0.2, cycle_id=1),
        record(1, "forward_backward", 0.3, 0.5, 0.9, cycle_id=2, loss=2.5),
        record(2, "optim_step", 0.3, 0.5, 0.9, cycle_id=2),
        record(3, "save_weights_for_sampler", 1.0, None, None),  # still queued
    ], cycles=[
        types.RunCycleRecord(cycle_id=1, started_at=T0 + 0.1, engine_ms=50, total_ms=100,
                             runs=1, tokens=0),
        types.RunCycleRecord(cycle_id=2, started_at=T0 + 0.5, engine_ms=300, total_ms=400,
                             runs=2, tokens=11, run_tokens=11, run_ops=2),
        types.RunCycleRecord(cycle_id=3, started_at=T0 + 1.1, engine_ms=10, total_ms=20,
                             runs=1, tokens=4, missed=True),
    ])
    ev = trace_events(run, history)["traceEvents"]
    begins = [e for e in ev if e["ph"] == "b"]
    ends = [e for e in ev if e["ph"] == "e"]
    assert sorted((e["cat"], e["id"]) for e in begins) == sorted((e["cat"], e["id"]) for e in ends)
    work = {e["args"]["seq_id"]: e for e in begins if e["tid"] == 2}
    assert {s: e["cat"] for s, e in work.items()} == {0: "create", 1: "pass", 2: "optimizer"}
    assert work[1]["args"]["loss"] == 2.5 and work[1]["ts"] == approx(0.5e6, abs=1)
    queue = {e["args"]["seq_id"]: e for e in begins if e["tid"] == 1}
    assert 3 not in queue  # the queued request has no span yet
    assert queue[1]["ts"] == approx(0.3e6, abs=1)
    cycles = [e for e in ev if e["ph"] == "X" and e["cat"] == "cycle"]
    assert [c["name"] for c in cycles] == ["cycle 1", "cycle 2"]
    assert [c["ts"] for c in cycles] == approx([0.1e6, 0.5e6], abs=1)
    assert [c["dur"] for c in cycles] == approx([100e3, 400e3], abs=1)
    engine = [e for e in ev if e["ph"] == "X" and e["cat"] == "engine"]
    assert [e["dur"] for e in engine] == [50e3, 300e3]
    assert [e["name"] for e in ev if e["ph"] == "i"] == ["missed cycle 3"]
