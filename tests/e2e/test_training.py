"""Training through a real server: learning, ordering, futures, errors, checkpoints."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import numpy as np
import pytest

import bios
from bios import types
from bios.exceptions import BadRequestError, BiosAPIError, NotFoundError
from server_process import ServerProcess

TINY = "bios/tiny-llama"


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:]})


BATCH = [datum([5, 17, 923, 40, 71, 88, 1024, 3]), datum([9, 8, 7, 6, 5, 4, 3, 2, 1])]


def logprobs_of(out: types.ForwardBackwardOutput) -> np.ndarray:
    return np.concatenate([o["logprobs"].to_numpy() for o in out.loss_fn_outputs])


def test_capabilities_and_info(service_client: bios.ServiceClient) -> None:
    caps = service_client.get_server_capabilities()
    names = {m.model_name: m for m in caps.supported_models}
    assert {TINY, "ultrasafe/usf-finance"} <= set(names)
    assert names[TINY].max_context_length == 2048
    client = service_client.create_lora_training_client(base_model=TINY, rank=8)
    info = client.get_info()
    assert info.model_id == client.model_id and info.lora_rank == 8


def test_supervised_fine_tune_loss_falls(service_client: bios.ServiceClient) -> None:
    client = service_client.create_lora_training_client(base_model=TINY, rank=16, seed=1)
    adam = types.AdamParams(learning_rate=5e-3)
    losses = []
    for _ in range(12):
        fb = client.forward_backward(BATCH, "cross_entropy")
        client.optim_step(adam)
        losses.append(fb.result().metrics["loss:sum"])
    assert losses[-1] < 0.5 * losses[0], losses


def test_order_kept_when_submitting_from_many_threads(service_client) -> None:
    """A run fed from 8 threads (seq ids taken in call order) ends exactly like the same calls
    made one by one; its forward results show it saw each optim_step in order."""
    adam = types.AdamParams(learning_rate=1e-2)
    calls = ["fb", "opt", "fwd"] * 4

    def drive(client: bios.TrainingClient, threads: int) -> list[np.ndarray]:
        futures: list = [None] * len(calls)
        lock = threading.Lock()
        nxt = iter(range(len(calls)))

        def worker() -> None:
            while True:
                with lock:  # call order = seq order; the HTTP submissions then race
                    i = next(nxt, None)
                    if i is None:
                        return
                    kind = calls[i]
                    if kind == "fb":
                        futures[i] = client.forward_backward(BATCH, "cross_entropy")
                    elif kind == "opt":
                        futures[i] = client.optim_step(adam)
                    else:
                        futures[i] = client.forward(BATCH, "cross_entropy")

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return [logprobs_of(f.result(timeout=120)) for f, k in zip(futures, calls, strict=True)
                if k == "fwd"]

    ref = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=7)
    expected = []
    for _ in range(4):  # the same calls, one at a time, each waited on
        ref.forward_backward(BATCH, "cross_entropy").result()
        ref.optim_step(adam).result()
        expected.append(logprobs_of(ref.forward(BATCH, "cross_entropy").result()))
    got = drive(service_client.create_lora_training_client(base_model=TINY, rank=8, seed=7), 8)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, atol=2e-2)
    # Each forward saw one more optim_step than the last, so no two are alike.
    assert all(np.abs(a - b).max() > 1e-4 for a, b in itertools.pairwise(got))


@pytest.fixture(scope="module")
def periodic_server(tmp_path_factory) -> ServerProcess:
    proc = ServerProcess(tmp_path_factory.mktemp("periodic"), [TINY], clock_period=1.0).start()
    yield proc
    proc.stop()


def test_double_await_first_means_submitted_second_means_done(periodic_server) -> None:
    service = bios.ServiceClient(base_url=periodic_server.base_url)
    client = service.create_lora_training_client(base_model=TINY, rank=4)

    async def main() -> tuple[float, float, types.ForwardBackwardOutput]:
        t0 = time.perf_counter()
        future = await client.forward_backward_async(BATCH, "cross_entropy")
        submitted = time.perf_counter() - t0
        result = await future
        return submitted, time.perf_counter() - t0, result

    submitted, done, result = asyncio.run(main())
    # The first await returns once stored (well before the next 1 s clock tick, on average);
    # the second waits for the cycle that runs it.
    assert submitted < 0.5, submitted
    assert done > submitted and result.metrics["loss:sum"] > 0
    log = periodic_server.log()
    assert "cycle " in log and "runs=1" in log and "tokens=" in log


def test_bad_input_is_a_clear_4xx_and_not_retried(service_client) -> None:
    client = service_client.create_lora_training_client(base_model=TINY, rank=4)
    bad = [types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                       loss_fn_inputs={"target_tokens": [2, 3]})]
    t0 = time.perf_counter()
    with pytest.raises(BadRequestError) as err:
        client.forward_backward(bad, "cross_entropy").result(timeout=30)
    assert time.perf_counter() - t0 < 5  # no retries with backoff
    assert "target_tokens" in str(err.value) and "length" in str(err.value)
    nan = [types.Datum(model_input=types.ModelInput.from_ints([1, 2]),
                       loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, float("nan")]})]
    with pytest.raises(BiosAPIError, match="NaN"):
        client.forward_backward(nan, "cross_entropy").result(timeout=30)
    with pytest.raises(BiosAPIError, match=r"clip_low_threshold|not used"):
        client.forward_backward(BATCH, "cross_entropy",
                                loss_fn_config={"clip_low_threshold": 0.5}).result(timeout=30)
    with pytest.raises(NotFoundError):
        client.load_state(f"bios://{client.model_id}/weights/missing").result(timeout=30)
    # The run is still usable and its later requests are not stuck behind the rejected ones.
    assert client.forward_backward(BATCH, "cross_entropy").result(timeout=60).loss > 0
    assert client.optim_step().result(timeout=60).metrics is not None
    with pytest.raises(NotFoundError, match="tiny-llama"):
        service_client.create_lora_training_client(base_model="no/such-model")


def test_checkpoint_resume_gives_the_same_next_step(service_client) -> None:
    adam = types.AdamParams(learning_rate=1e-2, weight_decay=0.01)
    a = service_client.create_lora_training_client(base_model=TINY, rank=8, seed=3)
    for _ in range(3):
        a.forward_backward(BATCH, "cross_entropy")
        a.optim_step(adam)
    path = a.save_state(name="step3").result().path
    assert path == f"bios://{a.model_id}/weights/step3"
    a.forward_backward(BATCH, "cross_entropy")
    a.optim_step(adam)
    expected = logprobs_of(a.forward(BATCH, "cross_entropy").result())

    b = service_client.create_training_client_from_state_with_optimizer(path)
    b.forward_backward(BATCH, "cross_entropy")
    b.optim_step(adam)
    got = logprobs_of(b.forward(BATCH, "cross_entropy").result())
    np.testing.assert_allclose(got, expected, atol=1e-2)

    # Weights only: fresh Adam moments, so the next step differs from the uninterrupted run.
    c = service_client.create_training_client_from_state(path)
    c.forward_backward(BATCH, "cross_entropy")
    c.optim_step(adam)
    other = logprobs_of(c.forward(BATCH, "cross_entropy").result())
    assert np.abs(other - expected).max() > 1e-3

    rest = service_client.create_rest_client()
    ids = [ck.checkpoint_id for ck in rest.list_checkpoints(a.model_id).checkpoints]
    assert "weights/step3" in ids
    rest.delete_checkpoint_from_tinker_path(path)
    assert "weights/step3" not in [
        ck.checkpoint_id for ck in rest.list_checkpoints(a.model_id).checkpoints]
    with pytest.raises(BiosAPIError):
        service_client.create_training_client_from_state(path)


def test_forward_backward_custom_matches_cross_entropy(service_client) -> None:
    torch = pytest.importorskip("torch")
    a = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=11)
    b = service_client.create_lora_training_client(base_model=TINY, rank=4, seed=11)

    def nll(data, logprobs):
        loss = sum(-lp.sum() for lp in logprobs)
        return loss, {"custom_nll": float(loss)}

    out = a.forward_backward_custom(BATCH, nll).result()
    assert out.metrics["custom_nll"] > 0
    b.forward_backward(BATCH, "cross_entropy").result()
    adam = types.AdamParams(learning_rate=1e-2)
    a.optim_step(adam).result()
    b.optim_step(adam).result()
    la = logprobs_of(a.forward(BATCH, "cross_entropy").result())
    lb = logprobs_of(b.forward(BATCH, "cross_entropy").result())
    np.testing.assert_allclose(la, lb, atol=1e-2)
    assert torch is not None


def test_schema_invalid_body_does_not_stall_the_run(server, service_client) -> None:
    """A raw client's malformed request still takes its seq slot; the next seq runs."""
    import httpx

    client = service_client.create_lora_training_client(base_model=TINY, rank=4)
    url = f"{server.base_url}/api/v1"
    bad = httpx.post(f"{url}/forward_backward", json={
        "model_id": client.model_id, "seq_id": 1,
        "forward_backward_input": {"data": [], "loss_fn": "no_such_loss"}})
    assert bad.status_code == 400 and "loss_fn" in bad.json()["detail"]
    good = BATCH[0].model_dump(mode="json")
    ok = httpx.post(f"{url}/forward", json={
        "model_id": client.model_id, "seq_id": 2,
        "forward_input": {"data": [good], "loss_fn": "cross_entropy"}})
    assert ok.status_code == 200, ok.text
    rid = ok.json()["request_id"]
    res = httpx.post(f"{url}/retrieve_future", json={"request_id": rid}, timeout=60).json()
    assert "loss_fn_outputs" in res, res


def test_checkpoint_of_an_alias_run_loads(service_client) -> None:
    a = service_client.create_lora_training_client(base_model="ultrasafe/usf-finance", rank=4)
    a.forward_backward(BATCH, "cross_entropy")
    a.optim_step(types.AdamParams(learning_rate=1e-2))
    path = a.save_state(name="alias").result().path
    b = service_client.create_training_client_from_state_with_optimizer(path)
    np.testing.assert_allclose(logprobs_of(b.forward(BATCH, "cross_entropy").result()),
                               logprobs_of(a.forward(BATCH, "cross_entropy").result()),
                               atol=1e-2)
    # A run on the canonical name loads it too: aliases share one model.
    c = service_client.create_lora_training_client(base_model=TINY, rank=4)
    c.load_state(path).result(timeout=60)
