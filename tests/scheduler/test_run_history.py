"""The console's run history (`console_api.run_history`): requests in seq order with their
losses, one loss point per completed optim_step (the mean of the forward_backwards since the
step before), the run's cycles, and the incremental `after_*` cuts. No torch."""

from __future__ import annotations

import json

from test_scheduler import MODEL, make_run, submit

from bios.server.console_api import loss_of, run_history
from bios.server.store import Outcome, RunWork, Store

OPT = {"owner": "local", "base_model_name": MODEL, "wire": {"adam_params": {}}}


def fb_result(loss: float) -> dict:
    return {"loss_fn_outputs": [{"logprobs": {"data": [-1.0] * 50}}],
            "metrics": {"loss:sum": loss * 3, "loss:mean": loss}}


def test_loss_of_reads_the_stored_result_text() -> None:
    assert loss_of(json.dumps(fb_result(1.25))) == 1.25
    assert loss_of(json.dumps({"metrics": {"loss:mean": -3e-05}})) == -3e-05
    assert loss_of(json.dumps({"metrics": {"loss:mean": float("nan")}})) is None
    assert loss_of(json.dumps({"metrics": {}})) is None
    assert loss_of(None) is None


def test_steps_average_the_passes_before_each_optim_step(store: Store) -> None:
    make_run(store, "r1")
    ids = [submit(store, "r1", 1), submit(store, "r1", 2), submit(store, "r1", 3, "optim_step",
                                                                  OPT),
           submit(store, "r1", 4), submit(store, "r1", 5, "optim_step", OPT),
           submit(store, "r1", 6)]  # a pass with no step after it yet
    claimed = store.claim_cycle(MODEL, cutoff=1e12)
    assert [c.seq_id for c in claimed] == [0, 1, 2, 3, 4, 5, 6]
    results = {ids[0]: fb_result(4.0), ids[1]: fb_result(2.0), ids[2]: {},
               ids[3]: fb_result(1.0), ids[4]: {}}
    store.finish_many([Outcome(claimed[0].id, result={"model_id": "r1"})]
                      + [Outcome(rid, result=res) for rid, res in results.items()], cycle_id=7)
    store.record_cycle(MODEL, 100.0, 40.0, 50.0, 1, 6, 9, 1, cycle_id=7,
                       run_work={"r1": RunWork(tokens=9, ops=6, compute_ms=30.0)})
    h = run_history(store, "r1", after_seq=-1, after_cycle=0, after_step=0)
    assert [r.seq_id for r in h.requests] == list(range(7))
    assert [r.loss for r in h.requests] == [None, 4.0, 2.0, None, 1.0, None, None]
    assert h.requests[6].status == "running" and h.requests[1].cycle_id == 7
    assert [(c.cycle_id, c.engine_ms, c.run_tokens, c.run_ops, c.missed) for c in h.cycles] \
        == [(7, 40.0, 9, 6, False)]
    assert [(s.step, s.seq_id, s.loss) for s in h.steps] == [(1, 3, 3.0), (2, 5, 1.0)]
    later = run_history(store, "r1", after_seq=3, after_cycle=7, after_step=1)
    assert [r.seq_id for r in later.requests] == [4, 5, 6]
    assert [s.step for s in later.steps] == [2] and later.cycles == []
    assert run_history(store, "nope", -1, 0, 0).requests == []
