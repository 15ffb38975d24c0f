"""HTTP for the SDK: retry decisions as pure functions, plus the one place that awaits sockets.

Pure parts (tested without a network): `RetryPolicy`, `is_retryable_status`,
`parse_retry_after`, `retry_delay`, `RetryBudget`, `classify_poll_body`, `parse_result`.
I/O part: `Transport`, whose httpx clients live on the SDK loop (it must only be awaited there).

This module knows nothing about training, sampling or threads.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydantic

from bios import types
from bios.exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APITimeoutError,
    BiosAPIError,
    RequestFailedError,
    UnsafeArchiveError,
    error_from_response,
)

log = logging.getLogger("bios")

M = TypeVar("M", bound=pydantic.BaseModel)

API_PREFIX = "/api/v1"
# The server holds /retrieve_future up to ~30 s; a poll's read timeout stays well above that.
POLL_READ_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0


# ----------------------------------------------------------------------------- retry policy


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry one HTTP call.

    Delays grow as `base_delay * 2**attempt` up to `max_delay`, shortened by up to `jitter`
    (a fraction) at random; a server's Retry-After (capped at `max_retry_after`) replaces the
    computed delay. Retrying stops after `max_retries` retries or once `budget` seconds have
    passed since the first attempt, whichever comes first.

    A 429 is backpressure, not a failure: the server is up and asks us to wait. Those retries
    do not count against `max_retries` and stop only after `backpressure_budget` seconds, so a
    busy server never makes the SDK drop an ordered training request (which would leave a gap
    in the run's sequence).
    """

    max_retries: int = 40
    base_delay: float = 0.5
    max_delay: float = 10.0
    jitter: float = 0.25
    budget: float = 300.0
    max_retry_after: float = 60.0
    backpressure_budget: float = 3600.0


def is_retryable_status(status_code: int) -> bool:
    """408, 429 and 5xx are worth retrying; every other 4xx is the caller's to fix."""
    return status_code in (408, 429) or status_code >= 500


def parse_retry_after(headers: httpx.Headers | dict[str, str], now: float | None = None
                      ) -> float | None:
    """Seconds to wait from `Retry-After-Ms`, or `Retry-After` (seconds or an HTTP date)."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def retry_delay(attempt: int, policy: RetryPolicy, retry_after: float | None = None,
                rand: Callable[[], float] = random.random) -> float:
    """Seconds to sleep before retry number `attempt` (0-based)."""
    if retry_after is not None:
        return min(max(retry_after, 0.0), policy.max_retry_after)
    delay = min(policy.base_delay * (2.0 ** attempt), policy.max_delay)
    return delay * (1.0 - policy.jitter * rand())


class RetryBudget:
    """Counts the retries of one HTTP call and says how long to wait before the next (or stop)."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.attempt = 0
        self._clock = clock
        self._deadline = clock() + policy.budget
        self._backpressure_deadline = clock() + policy.backpressure_budget
        self._backpressure_waits = 0

    def next_delay(self, retry_after: float | None = None,
                   backpressure: bool = False) -> float | None:
        """The delay before the next retry, or None when retries are exhausted."""
        if backpressure:
            delay = retry_delay(min(self._backpressure_waits, 8), self.policy, retry_after)
            if self._clock() + delay > self._backpressure_deadline:
                return None
            self._backpressure_waits += 1
            return delay
        if self.attempt >= self.policy.max_retries:
            return None
        delay = retry_delay(self.attempt, self.policy, retry_after)
        if self._clock() + delay > self._deadline:
            return None
        self.attempt += 1
        return delay


# ----------------------------------------------------------------------------- polling outcomes


@dataclass(frozen=True)
class PollDone:
    """The request finished; `body` is its result JSON."""

    body: Any


@dataclass(frozen=True)
class PollTryAgain:
    """Not finished yet; poll again at once (the server already held the request)."""

    queue_state: str
    reason: str | None


@dataclass(frozen=True)
class PollFailed:
    """The request finished in a failed state."""

    error: str
    category: str


def classify_poll_body(body: Any) -> PollDone | PollTryAgain | PollFailed:
    """Decide what a `/retrieve_future` 200 body means."""
    if isinstance(body, str):  # tolerate a result sent as JSON text inside JSON
        try:
            body = json.loads(body)
        except ValueError:
            return PollDone(body)
    if isinstance(body, dict):
        if body.get("type") == "try_again":
            return PollTryAgain(str(body.get("queue_state") or "active"),
                                body.get("queue_state_reason"))
        if "error" in body and isinstance(body.get("error"), str):
            return PollFailed(body["error"], str(body.get("category") or "unknown"))
    return PollDone(body)


def parse_result(model: type[M], body: Any, what: str) -> M:
    """Validate a response body into `model`; a mismatch is an APIResponseValidationError."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        raise APIResponseValidationError(
            f"the server's response to {what} is not a valid {model.__name__}: {e}"
        ) from e


def api_root(base_url: str) -> str:
    """`http://host:8000` (or `http://host:8000/api/v1`) -> `http://host:8000/api/v1`."""
    root = base_url.rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return root if root.endswith(API_PREFIX) else root + API_PREFIX


# ----------------------------------------------------------------------------- I/O


def _decode(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def redact_url(url: str) -> str:
    """A signed URL without its credential (query and last path segment), for messages."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    head, sep, _ = base.rpartition("/")
    return f"{head}/<signed>" if sep and "://" in head else base


async def _save_stream(response: httpx.Response, dest: Path, url: str,
                       max_bytes: int | None) -> int:
    """Write a streamed body to `dest` (truncated first, so a retry starts over)."""
    total = 0
    with open(dest, "wb") as f:
        async for chunk in response.aiter_bytes(1 << 20):
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise UnsafeArchiveError(f"the download from {redact_url(url)} is larger than "
                                         f"the limit of {max_bytes} bytes")
            f.write(chunk)
    return total


class Transport:
    """Two httpx.AsyncClients on the SDK loop: one for calls, one for long-polls.

    Separate pools keep hundreds of held polls from starving submissions. The clients are made
    on first use inside the SDK loop (and remade if the loop changes, e.g. after a fork).
    """

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float,
                 policy: RetryPolicy, http_transport: httpx.AsyncBaseTransport | None = None,
                 user_agent: str = "bios-python") -> None:
        self.root = api_root(base_url)
        self.policy = policy
        self.timeout = timeout
        self._api_key = api_key
        self._http_transport = http_transport
        self._user_agent = user_agent
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: httpx.AsyncClient | None = None
        self._poll: httpx.AsyncClient | None = None

    def _client(self, poll: bool) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._api is None or self._poll is None:
            headers = {"User-Agent": self._user_agent}
            if self._api_key:
                headers["X-API-Key"] = self._api_key
            self._api = httpx.AsyncClient(
                base_url=self.root, headers=headers, transport=self._http_transport,
                timeout=httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT, pool=None),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=32))
            read = max(POLL_READ_TIMEOUT, self.timeout)
            self._poll = httpx.AsyncClient(
                base_url=self.root, headers=headers, transport=self._http_transport,
                timeout=httpx.Timeout(read, connect=CONNECT_TIMEOUT, pool=None),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))
            self._loop = loop
        return self._poll if poll else self._api

    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: dict[str, Any] | None = None, poll: bool = False,
                      headers: dict[str, str] | None = None) -> Any:
        """Send one call, retrying per `self.policy`; return the decoded JSON body.

        `json_body` is a JSON-able value or already-encoded JSON bytes; every retry sends the
        same bytes. Raises an APIStatusError subclass for a non-retryable (or finally failed)
        status, and APIConnectionError / APITimeoutError when no response came back.
        """
        return _decode(await self._send(method, path, json_body=json_body, params=params,
                                        poll=poll, headers=headers))

    async def request_redirect(self, method: str, path: str) -> httpx.Response:
        """Like `request`, but a redirect is not followed: a 3xx with a Location header is
        returned as the response (as is a 2xx), for the caller to read its headers."""
        return await self._send(method, path, redirect_ok=True)

    async def _send(self, method: str, path: str, *, json_body: Any = None,
                    params: dict[str, Any] | None = None, poll: bool = False,
                    redirect_ok: bool = False, headers: dict[str, str] | None = None
                    ) -> httpx.Response:
        budget = RetryBudget(self.policy)
        url = self.root + path
        if json_body is not None and not isinstance(json_body, bytes):
            json_body = json.dumps(json_body).encode()
        if json_body is not None:
            headers = {"Content-Type": "application/json", **(headers or {})}
        while True:
            retry_after: float | None = None
            status = 0
            try:
                response = await self._client(poll).request(method, path, content=json_body,
                                                            params=params, headers=headers)
            except httpx.TimeoutException as e:
                err: BiosAPIError = APITimeoutError(
                    f"{method} {url} timed out ({type(e).__name__}); is the server overloaded?")
            except httpx.TransportError as e:
                err = APIConnectionError(
                    f"could not reach the Bios server at {self.root} ({type(e).__name__}: {e}); "
                    "is it running, and is BIOS_BASE_URL right?")
            else:
                if response.is_success or (redirect_ok and response.is_redirect):
                    return response
                err = error_from_response(response.status_code, _decode(response), method=method,
                                          url=url, reason=response.reason_phrase)
                status = response.status_code
                if not is_retryable_status(status):
                    raise err
                retry_after = parse_retry_after(response.headers)
            delay = budget.next_delay(retry_after, backpressure=status == 429)
            if delay is None:
                raise err
            log.info("bios: %s %s failed (%s); retry %d in %.2f s", method, path, err,
                     budget.attempt, delay)
            await asyncio.sleep(delay)

    async def download(self, url: str, dest: str | os.PathLike[str], *,
                       max_bytes: int | None = None) -> int:
        """Stream GET `url` (absolute, e.g. a signed URL) into the file `dest`; return its size.

        Sends no API key: the URL carries its own credential and may point at another host
        (so messages and logs name it without that credential). Connection errors and
        retryable statuses restart the download per `self.policy`; other statuses raise their
        APIStatusError. More than `max_bytes` raises UnsafeArchiveError.
        """
        budget = RetryBudget(self.policy)
        shown = redact_url(url)
        timeout = httpx.Timeout(self.timeout, connect=CONNECT_TIMEOUT)
        async with httpx.AsyncClient(headers={"User-Agent": self._user_agent},
                                     transport=self._http_transport, timeout=timeout,
                                     follow_redirects=True) as client:
            while True:
                retry_after: float | None = None
                status = 0
                try:
                    async with client.stream("GET", url) as response:
                        if response.is_success:
                            return await _save_stream(response, Path(dest), url, max_bytes)
                        await response.aread()
                        status = response.status_code
                        err: BiosAPIError = error_from_response(
                            status, _decode(response), method="GET", url=shown,
                            reason=response.reason_phrase)
                        if not is_retryable_status(status):
                            raise err
                        retry_after = parse_retry_after(response.headers)
                except httpx.TimeoutException as e:
                    err = APITimeoutError(f"GET {shown} timed out ({type(e).__name__})")
                except httpx.TransportError as e:
                    err = APIConnectionError(f"downloading {shown} failed "
                                             f"({type(e).__name__})")
                delay = budget.next_delay(retry_after, backpressure=status == 429)
                if delay is None:
                    raise err
                log.info("bios: download of %s failed (%s); retry %d in %.2f s", shown, err,
                         budget.attempt, delay)
                await asyncio.sleep(delay)

    async def submit(self, path: str, body: bytes | dict[str, Any],
                     headers: dict[str, str] | None = None) -> types.UntypedAPIFuture:
        """POST a request (JSON bytes or value) whose reply is the id of a server-side future."""
        reply = await self.request("POST", path, json_body=body, headers=headers)
        return parse_result(types.UntypedAPIFuture, reply, path)

    async def wait_result(self, request_id: str) -> Any:
        """Long-poll `/retrieve_future` until the request finishes; return its result JSON.

        Re-polls at once on try_again (the server holds each poll); transport errors are retried
        by `request`. Raises RequestFailedError if the request failed.
        """
        last_state = "active"
        while True:
            body = await self.request("POST", "/retrieve_future",
                                      json_body={"request_id": request_id}, poll=True)
            outcome = classify_poll_body(body)
            if isinstance(outcome, PollDone):
                return outcome.body
            if isinstance(outcome, PollFailed):
                hint = " (the request's input was rejected)" if outcome.category == "user" else ""
                raise RequestFailedError(f"request {request_id} failed{hint}: {outcome.error}",
                                         request_id=request_id, category=outcome.category)
            if outcome.queue_state != last_state:
                log.info("bios: request %s queue state %s%s", request_id, outcome.queue_state,
                         f": {outcome.reason}" if outcome.reason else "")
                last_state = outcome.queue_state

    async def aclose(self) -> None:
        """Close the HTTP clients (they are remade on next use)."""
        for client in (self._api, self._poll):
            if client is not None:
                await client.aclose()
        self._api = self._poll = None
        self._loop = None
