"""Every error the SDK raises, and the pure mapping from an HTTP error response to one of them.

Hierarchy (`except BiosAPIError` catches everything the server or the network reported):

    BiosError
      BiosAPIError
        APIStatusError                 an HTTP 4xx/5xx; .status_code .detail .field .code
          BadRequestError 400, AuthenticationError 401, PermissionDeniedError 403,
          NotFoundError 404, ConflictError 409, UnprocessableEntityError 422,
          RateLimitError 429, InternalServerError 5xx
        APIConnectionError             no usable response (after retries)
          APITimeoutError              ... because the request timed out (also a TimeoutError)
        APIResponseValidationError     the server answered with a body the SDK cannot read
        RequestFailedError             a submitted request finished in a failed state
      UnsafeArchiveError               a checkpoint archive that may not be extracted (also a
                                       ValueError); .member names the offending entry

This module knows nothing about httpx or the event loop.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BiosAPIError",
    "BiosError",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "UnprocessableEntityError",
    "UnsafeArchiveError",
    "error_from_response",
    "parse_error_body",
]


class BiosError(Exception):
    """Base class of every exception the Bios SDK raises on purpose."""


class BiosAPIError(BiosError):
    """The server (or the network on the way to it) reported an error.

    Attributes:
        message: the human-readable message (also `str(error)`).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIStatusError(BiosAPIError):
    """The server answered with an HTTP error status.

    Attributes:
        status_code: the HTTP status.
        detail: the server's explanation (what is wrong and how to fix it).
        field: the request field at fault, when the server named one.
        code: a short machine-readable error code, when the server sent one.
        body: the decoded response body (dict, list or text).
        method, url: the request that failed.
    """

    def __init__(self, message: str, *, status_code: int, detail: str, field: str | None = None,
                 code: str | None = None, body: Any = None, method: str | None = None,
                 url: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail
        self.field = field
        self.code = code
        self.body = body
        self.method = method
        self.url = url


class BadRequestError(APIStatusError):
    """HTTP 400: the request is invalid; `detail` says what to change."""


class AuthenticationError(APIStatusError):
    """HTTP 401: missing or wrong API key (set BIOS_API_KEY or pass api_key=)."""


class PermissionDeniedError(APIStatusError):
    """HTTP 403: the key is valid but may not touch this resource."""


class NotFoundError(APIStatusError):
    """HTTP 404: the run, checkpoint, sampler, request or model does not exist."""


class ConflictError(APIStatusError):
    """HTTP 409: the resource already exists or the slot is taken (e.g. a checkpoint name)."""


class UnprocessableEntityError(APIStatusError):
    """HTTP 422: the body does not match the wire schema."""


class RateLimitError(APIStatusError):
    """HTTP 429: the server's queue is full; retried automatically before this is raised."""


class InternalServerError(APIStatusError):
    """HTTP 5xx: the server failed; retried automatically before this is raised."""


class APIConnectionError(BiosAPIError):
    """No usable response: the server could not be reached or the connection broke."""


class APITimeoutError(APIConnectionError, TimeoutError):
    """A request timed out (after retries). Also a `TimeoutError`, so `except TimeoutError`
    (= `asyncio.TimeoutError`) catches it."""


class APIResponseValidationError(BiosAPIError):
    """The server's response did not have the expected shape (client/server version skew?)."""


class RequestFailedError(BiosAPIError):
    """A request the server accepted finished in a failed state.

    Attributes:
        request_id: the server's id of the request.
        category: "user" (the input was wrong: fix it and resubmit), "server" (the server
            failed running it) or "unknown".
    """

    def __init__(self, message: str, *, request_id: str, category: str = "unknown") -> None:
        super().__init__(message)
        self.request_id = request_id
        self.category = category


class UnsafeArchiveError(BiosError, ValueError):
    """A checkpoint archive was refused before anything was extracted: a member with an
    absolute or `..` path, a link or device, an odd name, a duplicate, or too many bytes.

    Attributes:
        member: the offending member's name (None when the archive as a whole is refused).
    """

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def _loc_to_field(loc: Any) -> str | None:
    """FastAPI's `loc` (["body", "input", "data", 0]) as "input.data.0"."""
    if not isinstance(loc, list | tuple):
        return None
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def parse_error_body(body: Any) -> tuple[str, str | None, str | None]:
    """Read (detail, field, code) out of an error body.

    Handles Bios's `{"detail": str, "field": str, "code": str}`, FastAPI's validation lists
    `{"detail": [{"loc": [...], "msg": "...", "type": "..."}, ...]}`, and plain text.
    """
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error", body.get("message")))
        field = body.get("field") if isinstance(body.get("field"), str) else None
        code = body.get("code") if isinstance(body.get("code"), str) else None
        if isinstance(detail, str):
            return detail, field, code
        if isinstance(detail, list) and detail:
            msgs = []
            for item in detail:
                if isinstance(item, dict):
                    where = _loc_to_field(item.get("loc"))
                    msg = str(item.get("msg", item))
                    msgs.append(f"{where}: {msg}" if where else msg)
                    if field is None:
                        field = where
                    if code is None and isinstance(item.get("type"), str):
                        code = item["type"]
                else:
                    msgs.append(str(item))
            return "; ".join(msgs), field, code
        if detail is not None:
            return json.dumps(detail), field, code
        return json.dumps(body), field, code
    if isinstance(body, str):
        return body.strip() or "(empty response body)", None, None
    if body is None:
        return "(empty response body)", None, None
    return json.dumps(body), None, None


def error_from_response(status_code: int, body: Any, *, method: str | None = None,
                        url: str | None = None, reason: str = "") -> APIStatusError:
    """Build the exception for an HTTP error status and its decoded body.

    The message carries the server's detail, the field at fault and the code, e.g.
    `400 Bad Request: rank must be <= 64 (field: lora_config.rank, code: bad_rank)`.
    """
    detail, field, code = parse_error_body(body)
    if status_code in _STATUS_CLASSES:
        cls = _STATUS_CLASSES[status_code]
    elif status_code >= 500:
        cls = InternalServerError
    else:
        cls = APIStatusError
    extras = ", ".join(x for x in (f"field: {field}" if field else "",
                                   f"code: {code}" if code else "") if x)
    head = f"{status_code} {reason}".strip()
    message = f"{head}: {detail}" + (f" ({extras})" if extras else "")
    if method and url:
        message += f" [{method} {url}]"
    return cls(message, status_code=status_code, detail=detail, field=field, code=code,
               body=body, method=method, url=url)
