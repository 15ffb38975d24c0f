"""Faults a real server cannot be made to produce on demand, through httpx.MockTransport:
which statuses are retried, with the same request each time, and how polling behaves."""

from __future__ import annotations

import time

import pytest
from fake_server import FakeBios, Fault, make_datum, make_service

import bios
from bios import exceptions as E


def calls_to(fake: FakeBios, path: str) -> list:
    return [body for _, p, body in fake.calls if p == path]


def test_4xx_is_raised_at_once_and_never_retried(fake: FakeBios,
                                                 service: bios.ServiceClient) -> None:
    fake.add_fault("/create_session", Fault(403, {"detail": "key may not create sessions",
                                                  "field": "X-API-Key"}))
    with pytest.raises(E.PermissionDeniedError, match="key may not create sessions") as info:
        service.create_lora_training_client(base_model="base")
    assert info.value.field == "X-API-Key"
    assert len(calls_to(fake, "/create_session")) == 1


def test_5xx_and_429_are_retried_until_success(fake: FakeBios,
                                               service: bios.ServiceClient) -> None:
    fake.add_fault("/create_session", Fault(503), Fault(429, headers={"Retry-After": "0"}),
                   Fault(500))
    client = service.create_lora_training_client(base_model="base")
    assert client.model_id == "sess1:train:0"
    assert len(calls_to(fake, "/create_session")) == 4


def test_connection_errors_are_retried(fake: FakeBios, service: bios.ServiceClient) -> None:
    fake.add_fault("/create_session", Fault(connect_error=True), Fault(connect_error=True))
    assert service.create_lora_training_client(base_model="base").model_id == "sess1:train:0"


def test_exhausted_retries_raise_the_last_error_with_its_detail(
        fake: FakeBios, service: bios.ServiceClient) -> None:
    fake.add_fault("/create_session", *[Fault(503, {"detail": "engine restarting"})] * 10)
    with pytest.raises(E.InternalServerError, match="engine restarting"):
        service.create_lora_training_client(base_model="base")
    assert len(calls_to(fake, "/create_session")) == 1 + service._transport.policy.max_retries


def test_unreachable_server_raises_api_connection_error(fake: FakeBios,
                                                        service: bios.ServiceClient) -> None:
    fake.add_fault("/get_server_capabilities", *[Fault(connect_error=True)] * 10)
    with pytest.raises(E.APIConnectionError, match="BIOS_BASE_URL"):
        service.get_server_capabilities()


def test_a_retried_training_op_resends_the_same_seq_id(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    fake.add_fault("/forward_backward", Fault(502), Fault(connect_error=True))
    training_client.forward_backward([make_datum()], "cross_entropy").result()
    bodies = calls_to(fake, "/forward_backward")
    assert len(bodies) == 3
    assert [b["seq_id"] for b in bodies] == [1, 1, 1]
    assert bodies[0] == bodies[1] == bodies[2]


def test_a_rejected_op_raises_on_await_and_later_ops_still_run(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    fake.add_fault("/forward_backward", Fault(400, {"detail": "datum 0 is too long",
                                                    "field": "forward_backward_input.data.0"}))
    bad = training_client.forward_backward([make_datum()], "cross_entropy")
    step = training_client.optim_step()
    with pytest.raises(E.BadRequestError, match="datum 0 is too long"):
        bad.result()
    assert step.result().metrics == {"lr": 1e-4}
    assert len(calls_to(fake, "/forward_backward")) == 1


def test_a_request_that_fails_on_the_server_raises_request_failed_error(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    fake.fail_results[1] = {"error": "token id 99999 is outside the vocabulary",
                            "category": "user"}
    fut = training_client.forward_backward([make_datum()], "cross_entropy")
    with pytest.raises(E.RequestFailedError, match="outside the vocabulary") as info:
        fut.result()
    assert info.value.category == "user"
    assert info.value.request_id.startswith("req-")


def test_polling_retries_transport_errors(fake: FakeBios,
                                          training_client: bios.TrainingClient) -> None:
    fake.add_fault("/retrieve_future", Fault(connect_error=True), Fault(504))
    assert training_client.optim_step().result().metrics == {"lr": 1e-4}


def test_polling_repolls_at_once_on_try_again(fake: FakeBios,
                                              training_client: bios.TrainingClient) -> None:
    fake.hold_results = True
    fake.poll_hold = 0.0  # the fake answers try_again immediately
    fut = training_client.optim_step()
    deadline = time.monotonic() + 30  # a deadline, not a fixed sleep: CI machines are slow
    while len(calls_to(fake, "/retrieve_future")) <= 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    polls = len(calls_to(fake, "/retrieve_future"))
    fake.release_all()
    fut.result(timeout=5)
    assert polls > 30  # no backoff sleeps between polls on the happy path


def test_api_key_is_sent_as_x_api_key(fake: FakeBios, service: bios.ServiceClient) -> None:
    service.get_server_capabilities()
    assert fake.headers[-1]["X-API-Key"] == "k-123"


def test_no_key_header_without_a_key(fake: FakeBios, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BIOS_API_KEY", raising=False)
    service = bios.ServiceClient(base_url="http://fake.test", http_transport=fake.transport())
    service.get_server_capabilities()
    assert "X-API-Key" not in fake.headers[-1]


def test_bad_response_shape_is_an_api_response_validation_error(fake: FakeBios) -> None:
    service = make_service(fake)
    fake.add_fault("/get_server_capabilities", Fault(200, {"models": []}))
    with pytest.raises(E.APIResponseValidationError, match="GetServerCapabilitiesResponse"):
        service.get_server_capabilities()


def test_ordered_ops_name_their_slot_and_report_given_up_seq_ids(
        fake: FakeBios, training_client: bios.TrainingClient) -> None:
    """Each training op names its (run, seq) slot in headers; one whose submission finally
    failed (here: retries exhausted on 507) is listed in the next op's abandoned header, once,
    so the server fills its slot and the run goes on."""
    fake.add_fault("/forward_backward", *[Fault(507, {"detail": "storage full"})] * 6)
    lost = training_client.forward_backward([make_datum()], "cross_entropy")
    with pytest.raises(E.APIStatusError, match="storage full"):
        lost.result()
    training_client.optim_step().result()
    training_client.optim_step().result()
    sent = [(h.get(bios.types.SLOT_SEQ_HEADER), h.get(bios.types.ABANDONED_SEQS_HEADER))
            for h in fake.headers if h.get(bios.types.SLOT_SEQ_HEADER)]
    assert sent[-2:] == [("2", "1"), ("3", None)]
    assert {h.get(bios.types.SLOT_RUN_HEADER) for h in fake.headers
            if h.get(bios.types.SLOT_SEQ_HEADER)} == {training_client.model_id}
