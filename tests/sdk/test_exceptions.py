"""Status -> exception mapping, and the hierarchy the seeds rely on (`except BiosAPIError`)."""

from __future__ import annotations

import pytest

from bios import exceptions as E
from bios.exceptions import BiosAPIError, error_from_response, parse_error_body


@pytest.mark.parametrize(("status", "cls"), [
    (400, E.BadRequestError), (401, E.AuthenticationError), (403, E.PermissionDeniedError),
    (404, E.NotFoundError), (409, E.ConflictError), (422, E.UnprocessableEntityError),
    (429, E.RateLimitError), (500, E.InternalServerError), (503, E.InternalServerError),
    (418, E.APIStatusError),
])
def test_each_status_maps_to_its_exception_class(status: int, cls: type) -> None:
    err = error_from_response(status, {"detail": "nope"})
    assert type(err) is cls
    assert err.status_code == status
    assert isinstance(err, BiosAPIError)


def test_message_carries_the_servers_detail_field_and_code() -> None:
    err = error_from_response(400, {"detail": "rank must be <= 64; pass a smaller rank",
                                    "field": "lora_config.rank", "code": "bad_rank"},
                              method="POST", url="http://h/api/v1/create_model",
                              reason="Bad Request")
    text = str(err)
    assert "rank must be <= 64; pass a smaller rank" in text
    assert "lora_config.rank" in text and "bad_rank" in text and "400" in text
    assert (err.detail, err.field, err.code) == ("rank must be <= 64; pass a smaller rank",
                                                 "lora_config.rank", "bad_rank")


def test_fastapi_validation_lists_become_one_readable_detail() -> None:
    body = {"detail": [
        {"loc": ["body", "forward_backward_input", "loss_fn"], "msg": "Input should be 'ppo'",
         "type": "literal_error"},
        {"loc": ["body", "seq_id"], "msg": "Field required", "type": "missing"},
    ]}
    detail, field, code = parse_error_body(body)
    assert detail == ("forward_backward_input.loss_fn: Input should be 'ppo'; "
                      "seq_id: Field required")
    assert field == "forward_backward_input.loss_fn"
    assert code == "literal_error"
    assert isinstance(error_from_response(422, body), E.UnprocessableEntityError)


def test_plain_text_and_empty_bodies_still_give_a_message() -> None:
    assert parse_error_body("Bad Gateway\n") == ("Bad Gateway", None, None)
    assert parse_error_body(None)[0] == "(empty response body)"
    assert "upstream" in str(error_from_response(502, "upstream died"))


def test_bios_api_error_catches_every_server_reported_error() -> None:
    for err in (E.RequestFailedError("x", request_id="r", category="user"),
                E.APIConnectionError("x"), E.APITimeoutError("x"),
                E.APIResponseValidationError("x"), error_from_response(500, None)):
        with pytest.raises(BiosAPIError):
            raise err
    assert issubclass(BiosAPIError, E.BiosError)


def test_api_timeout_is_also_a_timeout_error() -> None:
    # The seeds' `except asyncio.TimeoutError` (= TimeoutError in 3.11) catches it too.
    with pytest.raises(TimeoutError):
        raise E.APITimeoutError("timed out")


def test_request_failed_error_keeps_request_id_and_category() -> None:
    err = E.RequestFailedError("bad tokens", request_id="req-9", category="user")
    assert (err.request_id, err.category, str(err)) == ("req-9", "user", "bad tokens")
