"""TrainingClient: seq_ids fixed at call time, submissions in call order, request shapes."""

from __future__ import annotations

import asyncio
import random
import threading

import pydantic
import pytest
from fake_server import FakeBios, make_datum, make_service

import bios
from bios import types


def test_ops_from_several_threads_are_submitted_in_call_order(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    rng = random.Random(0)
    fake.submit_delay = {seq: rng.uniform(0, 0.02) for seq in range(1, 200)}
    fake.submit_delay[1] = 0.3  # the first op stalls: nothing may overtake it
    call_order: list[float] = []
    order_lock = threading.Lock()
    futures = []

    def worker(thread_no: int) -> None:
        for i in range(10):
            marker = float(thread_no * 100 + i)
            with order_lock:  # defines the call order the server must see
                call_order.append(marker)
                if (thread_no + i) % 2:
                    fut = training_client.optim_step(types.AdamParams(weight_decay=marker))
                else:
                    fut = training_client.forward_backward([make_datum()], "cross_entropy",
                                                           {"marker": marker})
                futures.append(fut)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for fut in futures:
        fut.result(timeout=10)

    ops = [(p, b) for p, b in fake.submits if p != "/create_model"]
    assert [b["seq_id"] for _, b in ops] == list(range(1, 81))
    seen = [b["adam_params"]["weight_decay"] if p == "/optim_step"
            else b["forward_backward_input"]["loss_fn_config"]["marker"] for p, b in ops]
    assert seen == call_order


def test_every_op_kind_takes_the_next_seq_id_starting_at_one(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    futs = [training_client.forward([make_datum()], "cross_entropy"),
            training_client.forward_backward([make_datum()], "cross_entropy"),
            training_client.optim_step(),
            training_client.save_state("a"),
            training_client.save_weights_for_sampler("s"),
            training_client.load_state("bios://sess1:train:0/weights/a"),
            training_client.load_state_with_optimizer("bios://sess1:train:0/weights/a")]
    results = [f.result(timeout=5) for f in futs]
    assert [(p, b.get("seq_id", b.get("model_seq_id"))) for p, b in fake.submits] == [
        ("/create_model", 0), ("/forward", 1), ("/forward_backward", 2), ("/optim_step", 3),
        ("/save_weights", 4), ("/save_weights_for_sampler", 5), ("/load_weights", 6),
        ("/load_weights", 7)]
    assert results[3].path == "bios://sess1:train:0/weights/a"
    assert results[4].path == "bios://sess1:train:0/sampler_weights/s"
    assert [b.get("optimizer") for p, b in fake.submits[-2:]] == [False, True]


def test_invalid_input_raises_at_call_time_without_using_a_seq_id(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    with pytest.raises(ValueError, match="empty"):
        training_client.forward_backward([], "cross_entropy")
    with pytest.raises(pydantic.ValidationError):
        training_client.forward_backward([make_datum()], "mse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="advantages"):
        training_client.forward_backward([make_datum(logprobs=[0.0] * 4)], "ppo")
    with pytest.raises(ValueError, match="bios://"):
        training_client.load_state("tinker://run/weights/a")
    with pytest.raises(TypeError, match="list of Datum"):
        training_client.forward(make_datum(), "cross_entropy")  # type: ignore[arg-type]
    training_client.optim_step().result(timeout=5)
    assert fake.submitted_seq_ids("/optim_step") == [1]


def test_optim_step_without_arguments_sends_default_adam_params(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    training_client.optim_step().result(timeout=5)
    sent = fake.submits[-1][1]["adam_params"]
    assert types.AdamParams.model_validate(sent) == types.AdamParams()


def test_forward_backward_body_is_the_wire_request(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    datum = make_datum(3, weights=[1.0, 0.0, 1.0])
    training_client.forward_backward([datum], "cross_entropy").result(timeout=5)
    body = fake.submits[-1][1]
    request = types.ForwardBackwardRequest.model_validate(body)
    assert request.model_id == training_client.model_id
    assert request.forward_backward_input.data[0] == datum
    assert "loss_fn_config" not in body["forward_backward_input"]  # None is left out


async def test_sync_calls_work_inside_a_running_event_loop(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    # The seeds call save_state (without waiting) and save_weights_and_get_sampling_client
    # from inside `async def`: the SDK's own loop does the I/O, so nothing deadlocks.
    fut = training_client.save_state(name="error_step_3")
    sampler = training_client.save_weights_and_get_sampling_client(name="eval_checkpoint")
    assert isinstance(sampler, bios.SamplingClient)
    assert fut.result(timeout=5).path.endswith("/weights/error_step_3")
    assert training_client.get_info().lora_rank == 8
    assert (await asyncio.sleep(0, "loop still alive")) == "loop still alive"


def test_save_weights_and_get_sampling_client_makes_an_ephemeral_snapshot(
        fake: FakeBios, service: bios.ServiceClient,
        training_client: bios.TrainingClient) -> None:
    first = service.create_sampling_client(base_model="base")
    snap = training_client.save_weights_and_get_sampling_client()
    body = fake.submits[-1][1]
    assert "path" not in body and body["sampling_session_seq_id"] == 1
    assert (first.sampling_session_id, snap.sampling_session_id) == ("sess1:sample:0",
                                                                    "sess1:sample:1")
    assert snap.get_base_model() == "base"


async def test_save_weights_and_get_sampling_client_async_is_one_await(
        training_client: bios.TrainingClient) -> None:
    sampler = await training_client.save_weights_and_get_sampling_client_async()
    assert isinstance(sampler, bios.SamplingClient)


def test_create_training_client_from_state_copies_the_checkpoint_shape(
        fake: FakeBios, service: bios.ServiceClient) -> None:
    path = "bios://old:train:0/weights/step10"
    client = service.create_training_client_from_state(path)
    client2 = service.create_training_client_from_state_with_optimizer(path)
    creates = [b for p, b in fake.submits if p == "/create_model"]
    loads = [b for p, b in fake.submits if p == "/load_weights"]
    assert creates[0]["lora_config"] == {"rank": 8, "train_mlp": True, "train_attn": False,
                                         "train_unembed": True}
    assert creates[0]["base_model"] == "base"
    assert [(b["model_id"], b["seq_id"], b["optimizer"], b["path"]) for b in loads] == [
        (client.model_id, 1, False, path), (client2.model_id, 1, True, path)]
    assert client.optim_step().result(timeout=5) is not None
    assert fake.submitted_seq_ids("/optim_step") == [2]


def test_create_lora_training_client_validates_before_any_io(
        fake: FakeBios, service: bios.ServiceClient) -> None:
    with pytest.raises(ValueError, match="at least one"):
        service.create_lora_training_client("base", train_mlp=False, train_attn=False,
                                            train_unembed=False)
    with pytest.raises(ValueError, match="rank"):
        service.create_lora_training_client("base", rank=0)
    with pytest.raises(ValueError, match="exactly one"):
        service.create_sampling_client()
    assert fake.calls == []


def test_constructor_does_no_io_and_reads_the_environment(
        fake: FakeBios, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIOS_BASE_URL", "http://from-env:9000")
    monkeypatch.setenv("BIOS_API_KEY", "env-key")
    service = bios.ServiceClient(http_transport=fake.transport())
    rest = service.create_rest_client()
    assert service.base_url == "http://from-env:9000"
    assert isinstance(rest, bios.RestClient)
    assert fake.calls == []
    service.get_server_capabilities()
    assert fake.headers[-1]["X-API-Key"] == "env-key"
    assert str(fake.headers and fake.calls[-1][1]) == "/get_server_capabilities"


def test_default_base_url_is_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIOS_BASE_URL", raising=False)
    assert bios.ServiceClient().base_url == "http://127.0.0.1:8000"


async def test_one_session_for_concurrent_client_creations(fake: FakeBios) -> None:
    service = make_service(fake)
    clients = await asyncio.gather(*[
        service.create_lora_training_client_async(base_model="base") for _ in range(5)])
    assert fake.sessions == 1
    assert sorted(c.model_id for c in clients) == [f"sess1:train:{i}" for i in range(5)]
