"""Tenants through a real server started with two API keys: authentication, isolation,
publishing, path safety, the non-loopback rule and per-tenant backpressure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import bios
from bios import types
from bios.exceptions import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
)
from bios.server.auth import hash_key
from server_process import KEY_A, KEY_B, ServerProcess

TINY = "bios/tiny-llama"
PROMPT = types.ModelInput.from_ints([5, 17, 923, 40])
GREEDY = types.SamplingParams(max_tokens=4, temperature=0.0)


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:]})


BATCH = [datum([5, 17, 923, 40, 71, 88, 1024, 3])]


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIOS_API_KEY", raising=False)


def client(server: ServerProcess, key: str | None) -> bios.ServiceClient:
    return bios.ServiceClient(base_url=server.base_url, api_key=key)


def raw(server: ServerProcess, method: str, path: str, key: str | None = None,
        **kw: Any) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    return httpx.request(method, f"{server.base_url}/api/v1{path}", headers=headers,
                         timeout=30, **kw)


@pytest.fixture(scope="module")
def alice_run(keyed_server: ServerProcess) -> dict[str, Any]:
    """Alice's run with a training checkpoint, a sampler checkpoint and a sampler."""
    alice = client(keyed_server, KEY_A)
    tc = alice.create_lora_training_client(base_model=TINY, rank=4, seed=3)
    tc.forward_backward(BATCH, "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result(timeout=120)
    state = tc.save_state("ck1").result(timeout=120).path
    sampler_path = tc.save_weights_for_sampler("s1").result(timeout=120).path
    sampler = alice.create_sampling_client(model_path=sampler_path)
    sampler.sample(PROMPT, 1, GREEDY).result(timeout=120)
    return {"client": alice, "tc": tc, "run": tc.model_id, "state": state,
            "sampler_path": sampler_path, "sampler_id": sampler.sampling_session_id}


# ----------------------------------------------------------------------------- authentication


def test_healthz_is_open_everything_else_needs_a_key(keyed_server: ServerProcess) -> None:
    assert raw(keyed_server, "GET", "/healthz").status_code == 200
    for key in (None, "wrong-key", hash_key(KEY_A)):
        r = raw(keyed_server, "GET", "/training_runs", key)
        assert r.status_code == 401, (key, r.text)
        assert "API key" in r.json()["detail"]
        r = raw(keyed_server, "POST", "/create_session", key, json={})
        assert r.status_code == 401
    assert raw(keyed_server, "GET", "/get_server_capabilities").status_code == 401
    r = httpx.get(f"{keyed_server.base_url}/api/v1/training_runs", timeout=30,
                  headers={"Authorization": f"Bearer {KEY_B}"})
    assert r.status_code == 200


def test_sdk_without_or_with_a_wrong_key_gets_401_at_once(keyed_server: ServerProcess) -> None:
    for key in (None, "bios_wrong"):
        t0 = time.monotonic()
        with pytest.raises(AuthenticationError, match="401"):
            client(keyed_server, key).create_lora_training_client(base_model=TINY, rank=4)
        assert time.monotonic() - t0 < 10  # a 4xx is never retried


def test_sdk_reads_bios_api_key(keyed_server: ServerProcess,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIOS_API_KEY", KEY_B)
    rest = bios.ServiceClient(base_url=keyed_server.base_url).create_rest_client()
    assert rest.list_training_runs().training_runs is not None


# ----------------------------------------------------------------------------- isolation


def test_other_tenant_sees_nothing_of_alices(keyed_server: ServerProcess,
                                             alice_run: dict[str, Any]) -> None:
    run, state, spath = alice_run["run"], alice_run["state"], alice_run["sampler_path"]
    alice_rest = alice_run["client"].create_rest_client()
    assert run in alice_rest.list_training_run_ids()
    assert alice_rest.get_training_run(run).model_owner == "alice"

    bob = client(keyed_server, KEY_B)
    rest = bob.create_rest_client()
    assert run not in rest.list_training_run_ids()
    for call in (lambda: rest.get_training_run(run),
                 lambda: rest.list_checkpoints(run),
                 lambda: rest.get_training_run_by_tinker_path(state),
                 lambda: rest.get_weights_info_by_tinker_path(state),
                 lambda: rest.get_sampler(alice_run["sampler_id"]),
                 lambda: rest.delete_checkpoint_from_tinker_path(state),
                 lambda: rest.publish_checkpoint_from_tinker_path(state),
                 lambda: bob.create_sampling_client(model_path=spath),
                 lambda: bob.create_training_client_from_state(state)):
        with pytest.raises(NotFoundError):
            call()
    # Sampling on Alice's sampler id, or training on her run id, with Bob's key.
    foreign_sampler = bios.SamplingClient(bob, alice_run["sampler_id"], base_model=TINY)
    with pytest.raises(NotFoundError):
        foreign_sampler.sample(PROMPT, 1, GREEDY).result(timeout=60)
    body = {"model_id": run, "seq_id": 999, "forward_backward_input": {
        "data": [BATCH[0].model_dump(mode="json")], "loss_fn": "cross_entropy"}}
    r = raw(keyed_server, "POST", "/forward_backward", KEY_B, json=body)
    assert r.status_code == 404 and "alice" not in r.text
    # Alice's futures.
    sid = raw(keyed_server, "POST", "/create_session", KEY_A, json={}).json()["session_id"]
    fut = raw(keyed_server, "POST", "/create_model", KEY_A, json={
        "session_id": sid, "model_seq_id": 0, "base_model": TINY,
        "lora_config": {"rank": 4}}).json()
    r = raw(keyed_server, "POST", "/retrieve_future", KEY_B,
            json={"request_id": fut["request_id"]})
    assert r.status_code == 404
    assert raw(keyed_server, "POST", "/retrieve_future", KEY_A,
               json={"request_id": fut["request_id"]}).status_code == 200
    # Bob cannot use Alice's session either.
    r = raw(keyed_server, "POST", "/create_model", KEY_B, json={
        "session_id": sid, "model_seq_id": 1, "base_model": TINY, "lora_config": {"rank": 4}})
    assert r.status_code == 404
    r = raw(keyed_server, "POST", "/session_heartbeat", KEY_B, json={"session_id": sid})
    assert r.status_code == 404
    # Alice's own run still works.
    assert alice_run["tc"].forward(BATCH, "cross_entropy").result(timeout=120)


def test_publish_lets_others_load_and_sample_but_not_delete(
        keyed_server: ServerProcess, alice_run: dict[str, Any]) -> None:
    alice = alice_run["client"].create_rest_client()
    state, spath = alice_run["state"], alice_run["sampler_path"]
    bob = client(keyed_server, KEY_B)
    bob_rest = bob.create_rest_client()

    alice.publish_checkpoint_from_tinker_path(state)
    alice.publish_checkpoint_from_tinker_path(spath)
    with pytest.raises(ConflictError):
        alice.publish_checkpoint_from_tinker_path(state)
    listed = {c.tinker_path: c.public for c in alice.list_checkpoints(alice_run["run"]).checkpoints}
    assert listed[state] and listed[spath]

    # Bob: load (both ways) and sample.
    assert bob_rest.get_weights_info_by_tinker_path(state).lora_rank == 4
    tc = bob.create_training_client_from_state(state)
    assert tc.forward_backward(BATCH, "cross_entropy").result(timeout=120).metrics
    own = bob.create_lora_training_client(base_model=TINY, rank=4)
    own.load_state(state).result(timeout=120)
    sampler = bob.create_sampling_client(model_path=spath)
    out = sampler.sample(PROMPT, 1, GREEDY).result(timeout=120)
    assert len(out.sequences[0].tokens) == 4
    # ... but neither delete nor unpublish it (403: it is visible, just not his), and its run
    # stays private.
    with pytest.raises(PermissionDeniedError):
        bob_rest.delete_checkpoint_from_tinker_path(state)
    with pytest.raises(PermissionDeniedError):
        bob_rest.unpublish_checkpoint_from_tinker_path(spath)
    with pytest.raises(NotFoundError):
        bob_rest.get_training_run_by_tinker_path(state)
    assert tc.model_id not in alice.list_training_run_ids()  # Bob's run is Bob's

    # Unpublished: Bob's sampler stops working and he cannot make new ones.
    alice.unpublish_checkpoint_from_tinker_path(spath)
    with pytest.raises(ConflictError):
        alice.unpublish_checkpoint_from_tinker_path(spath)
    with pytest.raises(NotFoundError):
        sampler.sample(PROMPT, 1, GREEDY).result(timeout=60)
    with pytest.raises(NotFoundError):
        bob.create_sampling_client(model_path=spath)
    # The owner can still delete what she published.
    alice.delete_checkpoint_from_tinker_path(state)
    with pytest.raises(NotFoundError):
        bob.create_training_client_from_state(state)


# ----------------------------------------------------------------------------- path safety


@pytest.mark.parametrize("name", [
    "..", "%2e%2e", "%2E%2E", "a..b", ".hidden", "caf%C3%A9", "%E2%80%AE",
    "x" * 129, "x" * 5000, "%00", "a%0A", "%20a",
])
def test_checkpoint_names_cannot_escape_the_data_dir(keyed_server: ServerProcess,
                                                     alice_run: dict[str, Any],
                                                     name: str) -> None:
    run = alice_run["run"]
    for method, suffix in (("DELETE", ""), ("POST", "/publish"), ("DELETE", "/publish")):
        url = f"{keyed_server.base_url}/api/v1/training_runs/{run}/checkpoints/weights/{name}"
        r = httpx.request(method, url + suffix, headers={"X-API-Key": KEY_A}, timeout=30)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    tc = alice_run["tc"]
    for bad in ("../../../etc", "/abs/path", "a/b", "..", "naïve", "x" * 200, "a\nb", ""):
        with pytest.raises(bios.exceptions.BadRequestError):
            tc.save_state(bad).result(timeout=60)
        with pytest.raises(bios.exceptions.BadRequestError):
            tc.save_weights_for_sampler(bad).result(timeout=60)
    for bad_path in (f"bios://{run}/weights/..", f"bios://{run}/weights/../../x",
                     f"bios://{run}/weights/ck1\n", "/etc/passwd", "file:///etc/passwd",
                     f"bios://{run}/../weights/ck1"):
        r = raw(keyed_server, "POST", "/weights_info", KEY_A, json={"tinker_path": bad_path})
        assert r.status_code in (400, 404), (bad_path, r.text)
    # Everything the server wrote is inside its data dir.
    root = keyed_server.data_dir.resolve()
    for p in root.rglob("*"):
        assert root in p.resolve().parents


# ----------------------------------------------------------------------------- binding


def run_serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bios.cli", "serve", *args],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in {**os.environ, **env}.items()
                               if k not in ("BIOS_API_KEYS", "BIOS_API_KEYS_FILE")})


def test_non_loopback_bind_without_keys_refuses_to_start(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::"):
        out = run_serve(["--host", host, "--port", "0", "--data-dir", str(tmp_path)], {})
        assert out.returncode == 2, out
        assert "refusing to serve" in out.stderr and "--api-keys-file" in out.stderr
    assert not (tmp_path / "bios.db").exists()  # it stopped before touching anything


# ----------------------------------------------------------------------------- backpressure


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Clock every 3 s and at most 3 queued requests per tenant."""
    proc = ServerProcess(tmp_path_factory.mktemp("tight"), [TINY], clock_period=3.0,
                         extra_args=["--max-queued-per-tenant", "3"]).start()
    yield proc
    proc.stop()


def test_tenant_queue_limit_gives_429_with_state_and_the_sdk_retries(
        tight_server: ServerProcess) -> None:
    sc = bios.ServiceClient(base_url=tight_server.base_url)
    tc = sc.create_lora_training_client(base_model=TINY, rank=4)
    time.sleep(3.5)  # let the create run
    # Raw: fill the tenant's queue (a tick may drain it; keep going), then the next is a 429
    # carrying the queue state. Stop there: a 429 leaves its seq slot empty.
    r = None
    for seq in range(1, 30):
        body = {"model_id": tc.model_id, "seq_id": seq, "forward_input": {
            "data": [BATCH[0].model_dump(mode="json")], "loss_fn": "cross_entropy"}}
        r = httpx.post(f"{tight_server.base_url}/api/v1/forward", json=body, timeout=30)
        if r.status_code != 200:
            break
    assert r is not None and r.status_code == 429, r and r.text
    assert r.json()["queue_state"] == {"scope": "tenant", "queued": 3, "limit": 3,
                                       "unit": "requests"}
    assert r.json()["code"] == "queue_full" and "per tenant" in r.json()["detail"]
    assert r.headers["retry-after"] == "1"
    # SDK: 8 ops through a queue of 3 all complete; none dropped, order kept.
    tc2 = sc.create_lora_training_client(base_model=TINY, rank=4)
    futs = [tc2.forward(BATCH, "cross_entropy") for _ in range(8)]
    results = [f.result(timeout=120) for f in futs]
    assert len(results) == 8 and all(r.loss_fn_outputs for r in results)
