"""Fair cycles on a real server with two tenants: a flooding tenant's backlog does not hold up
another tenant's request, a request bigger than a cycle is split across cycles and answered
whole, and the per-tenant token limits answer 413 / 429 naming their flag. Assertions are on
the order of the server's own cycle ids, not on wall-clock time."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

import bios
from bios import types
from bios.server.auth import hash_key
from server_process import ServerProcess

TINY = "bios/tiny-llama"
KEY_A, KEY_B = "bios_flood-a", "bios_victim-b"
BIG_DATUMS, DATUM_TOKENS = 48, 64  # 3072 tokens: at least 12 cycles of 256


def datum(n: int, salt: int) -> types.Datum:
    tokens = [(salt * 13 + i * 7) % 3000 + 5 for i in range(n + 1)]
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:]})


@pytest.fixture(scope="module")
def fair_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Cycles of at most 256 tokens (passes of 256 too), one every 0.2 s at most; a tenant may
    have at most 6000 tokens unfinished and 4000 in one request, and store 20000 bytes (the
    tiny model's rank-4 checkpoint is bigger: one save gets in, the next is refused)."""
    root = tmp_path_factory.mktemp("fair")
    keys = root / "keys"
    keys.write_text(f"A:{hash_key(KEY_A)}\nB:{hash_key(KEY_B)}\n")
    proc = ServerProcess(root / "data", [TINY], clock_period=0.2, extra_args=[
        "--api-keys-file", str(keys), "--token-budget", "256", "--cycle-tokens", "256",
        "--cycle-seconds", "0", "--max-tokens-per-request", "4000",
        "--max-queued-tokens-per-tenant", "6000", "--max-metadata-bytes", "100",
        "--max-stored-bytes-per-tenant", "20000"]).start()
    yield proc
    proc.stop()


def rows(server: ServerProcess, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(server.data_dir / "bios.db") as db:
        return db.execute(sql, args).fetchall()


def test_a_small_tenant_goes_ahead_of_a_flood_and_the_big_request_is_split(
        fair_server: ServerProcess) -> None:
    a = bios.ServiceClient(base_url=fair_server.base_url, api_key=KEY_A)
    b = bios.ServiceClient(base_url=fair_server.base_url, api_key=KEY_B)
    big_run = a.create_lora_training_client(base_model=TINY, rank=4, seed=1)
    small_runs = [a.create_lora_training_client(base_model=TINY, rank=4, seed=2 + i)
                  for i in range(2)]
    victim = b.create_lora_training_client(base_model=TINY, rank=4, seed=9)
    big_data = [datum(DATUM_TOKENS, i) for i in range(BIG_DATUMS)]
    big = big_run.forward_backward(big_data, "cross_entropy")
    floods = [small_runs[i % 2].forward_backward([datum(32, 100 + i)], "cross_entropy")
              for i in range(16)]
    # Wait until A's flood is stored, then B trains one step.
    (stored,) = rows(fair_server, "SELECT COUNT(*) FROM requests WHERE owner = 'A' AND "
                     "kind = 'forward_backward'")[0]
    while stored < 17:
        (stored,) = rows(fair_server, "SELECT COUNT(*) FROM requests WHERE owner = 'A' "
                         "AND kind = 'forward_backward'")[0]
    victim.forward_backward([datum(16, 7)], "cross_entropy")
    victim.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=300)
    out = big.result(timeout=600)
    for f in floods:
        f.result(timeout=600)

    # B's step ran in a cycle before A's big request finished (which took many cycles).
    [(b_cycle,)] = rows(fair_server, "SELECT MAX(cycle_id) FROM requests WHERE owner = 'B' "
                        "AND kind = 'optim_step'")
    [(big_cycle,)] = rows(fair_server, "SELECT cycle_id FROM requests WHERE run_id = ? AND "
                          "kind = 'forward_backward'", big_run.model_id)
    assert b_cycle < big_cycle
    big_cycles = rows(fair_server, "SELECT cycle_id, tokens FROM run_cycles WHERE run_id = ? "
                      "AND tokens > 0", big_run.model_id)
    assert len(big_cycles) >= 12 and sum(t for _, t in big_cycles) == BIG_DATUMS * DATUM_TOKENS
    assert max(t for (t,) in rows(fair_server, "SELECT tokens FROM cycles")) <= 256
    # The split request's answer is whole: one output per datum, in order, and its loss.
    assert len(out.loss_fn_outputs) == BIG_DATUMS
    assert [len(o["logprobs"].data) for o in out.loss_fn_outputs] == [DATUM_TOKENS] * BIG_DATUMS
    assert out.metrics["loss:sum"] > 0 and out.metrics["loss:mean"] == pytest.approx(
        out.metrics["loss:sum"] / (BIG_DATUMS * DATUM_TOKENS), rel=1e-5)


def test_token_limits_answer_413_and_429_naming_the_flag(fair_server: ServerProcess) -> None:
    a = bios.ServiceClient(base_url=fair_server.base_url, api_key=KEY_A)
    tc = a.create_lora_training_client(base_model=TINY, rank=4)

    def post(seq: int, datums: int, tokens: int = 100) -> httpx.Response:
        body = {"model_id": tc.model_id, "seq_id": seq, "forward_backward_input": {
            "data": [datum(tokens, i).model_dump(mode="json") for i in range(datums)],
            "loss_fn": "cross_entropy"}}
        return httpx.post(f"{fair_server.base_url}/api/v1/forward_backward", json=body,
                          headers={"X-API-Key": KEY_A}, timeout=60)

    r = post(1, 41)  # 4100 tokens > 4000
    assert r.status_code == 413 and "--max-tokens-per-request" in r.json()["detail"]
    assert post(2, 39).status_code == 200  # 3900 tokens queued
    # 7800 unfinished > 6000: the first takes at least 16 cycles of 0.2 s, so it is unfinished.
    r = post(3, 39)
    assert r.status_code == 429, r.text
    detail = r.json()["detail"]
    assert "--max-queued-tokens-per-tenant" in detail and "3900 tokens queued" in detail
    assert r.json()["queue_state"] == {"scope": "tenant", "queued": 3900, "limit": 6000,
                                       "unit": "tokens"}


def test_stored_bytes_and_metadata_limits_answer_413_naming_the_flag(
        fair_server: ServerProcess) -> None:
    b = bios.ServiceClient(base_url=fair_server.base_url, api_key=KEY_B)
    with pytest.raises(Exception, match="--max-metadata-bytes"):
        b.create_lora_training_client(base_model=TINY, rank=4, user_metadata={"x": "y" * 200})
    tc = b.create_lora_training_client(base_model=TINY, rank=4, user_metadata={"x": "y"})
    tc.save_state("first").result(timeout=300)
    [(size,)] = rows(fair_server, "SELECT size_bytes FROM checkpoints WHERE run_id = ?",
                     tc.model_id)
    assert size > 20000  # the checkpoint's files, as stored
    with pytest.raises(Exception, match="--max-stored-bytes-per-tenant"):
        tc.save_state("second").result(timeout=300)
    # The refused save filled its seq slot: the run goes on.
    tc.forward_backward([datum(8, 1)], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=300)


def test_resident_runs_past_the_bound_evict_the_least_recently_used_which_reloads_exactly(
        tmp_path) -> None:
    """--max-resident-runs 2: a third run unloads the least recently used one (after a
    snapshot); its next request reloads it with the weights it left with, to the last bit."""
    from test_crash_recovery import probe, step

    server = ServerProcess(tmp_path / "data", [TINY],
                           extra_args=["--max-resident-runs", "2"]).start()
    try:
        sc = bios.ServiceClient(base_url=server.base_url)
        runs = [sc.create_lora_training_client(base_model=TINY, rank=4, seed=s)
                for s in range(3)]
        step(runs[0], 0)
        before = probe(runs[0])
        step(runs[1], 0)
        step(runs[2], 0)  # r0 is the least recently used idle run: evicted before this
        reloaded = f"reloaded run {runs[0].model_id}"
        log = server.log()
        assert f"least recently used runs of {TINY} (resident bound 2" in log
        n = log.count(reloaded)
        after = probe(runs[0])  # reloaded from its snapshot
        assert server.log().count(reloaded) == n + 1
        np.testing.assert_array_equal(after, before)
        step(runs[0], 1)  # and it trains on
    finally:
        server.stop()


def test_resident_bytes_past_the_bound_evict_the_least_recently_used_run(tmp_path) -> None:
    """--max-resident-bytes of 3.5 rank-4 runs (fp32 adapter + AdamW, from the tiny model's
    dims): two rank-4 runs fit; a rank-8 run (two units; three runs are within every count
    bound) unloads the least recently used one, which reloads with the weights it left
    with."""
    import json

    from test_crash_recovery import probe, step

    from bios.server.plan import AdapterSpec, ModelDims, resident_bytes
    from server_process import MODEL_CACHE

    hf = json.loads((MODEL_CACHE / "bios--tiny-llama" / "config.json").read_text())
    head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    dims = ModelDims(hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"],
                     hf["num_attention_heads"] * head, hf["num_key_value_heads"] * head,
                     hf["vocab_size"])
    unit = resident_bytes(dims, AdapterSpec(rank=4, seed=0))
    server = ServerProcess(tmp_path / "data", [TINY],
                           extra_args=["--max-resident-bytes", str(unit * 7 // 2)]).start()
    try:
        sc = bios.ServiceClient(base_url=server.base_url)
        r0, r1 = (sc.create_lora_training_client(base_model=TINY, rank=4, seed=s)
                  for s in range(2))
        step(r0, 0)
        before = probe(r0)
        step(r1, 0)
        assert "least recently used" not in server.log()
        r2 = sc.create_lora_training_client(base_model=TINY, rank=8, seed=2)
        step(r2, 0)
        log = server.log()
        assert f"evicted 1 least recently used runs of {TINY}" in log
        assert f"{unit * 7 // 2} bytes" in log and f": {r0.model_id}" in log
        after = probe(r0)  # reloaded from its snapshot; r1 (now least recently used) leaves
        assert server.log().count(f"reloaded run {r0.model_id}") == 1
        assert f": {r1.model_id}" in server.log()
        np.testing.assert_array_equal(after, before)
        # An adapter that alone is over the bound (rank 16: four units) is a 413 at creation.
        with pytest.raises(bios.APIStatusError) as e:
            sc.create_lora_training_client(base_model=TINY, rank=16, seed=3)
        assert e.value.status_code == 413 and "--max-resident-bytes" in str(e.value)
    finally:
        server.stop()
