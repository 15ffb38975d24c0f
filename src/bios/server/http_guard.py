"""The checks every HTTP request passes before a route: API key, then body size.

(The request head is bounded earlier, in the HTTP protocol: see http_protocol.py.)

A plain ASGI middleware, not Starlette's `BaseHTTPMiddleware`: that one runs each request's
route in an extra task with memory streams between them, and on a busy 2-core server it was
the largest share of the event loop's time (profiled in docs/benchmarks.md). Here a request
costs a header lookup and one dict write (`scope["state"]["owner"]`, read back as
`request.state.owner`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from bios import types as T
from bios.server.auth import KeyRing, presented_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOCAL_OWNER = "local"
OPEN_PATHS = frozenset({"/api/v1/healthz", "/console"})
# The dashboard's static files hold no data (the page asks for the key and sends it itself).
CONSOLE_FILE_RE = re.compile(r"^/console/(?:static|vendor)/[A-Za-z0-9_.-]+$")
# Signed archive downloads carry their credential in the URL (see archives.py); exactly one
# path segment of token characters is let through without an API key.
ARCHIVE_DOWNLOAD_RE = re.compile(r"^/api/v1/archives/[A-Za-z0-9_.-]+$")
# The SDK names the (run, seq_id) slot of each ordered training request in these headers,
# so that a request rejected before its body is parsed (413 here, unparseable JSON in the
# route) still fills its slot and the run's later requests do not wait for it forever.
RUN_HEADER = T.SLOT_RUN_HEADER
SEQ_HEADER = T.SLOT_SEQ_HEADER
_READ = frozenset({b"content-length", b"transfer-encoding", b"x-api-key", b"authorization",
                   RUN_HEADER.encode(), SEQ_HEADER.encode()})
# The routes whose requests take a run's seq slot; value: the request kind.
ORDERED_ROUTES = {f"/api/v1/{k}": k for k in (
    "forward_backward", "forward", "optim_step", "save_weights", "save_weights_for_sampler",
    "load_weights")}
# Bodies under this size skip the in-flight byte budget (the hot path stays a dict lookup).
SMALL_BODY = 256 * 1024
# An over-size body declared by Content-Length is read and dropped, up to this many times the
# limit, so that the client (which is still sending it) reads the 413 instead of a reset.
DRAIN_FACTOR = 4
RejectSlot = Callable[[str, str, int, str, str], Awaitable[None]]

log = logging.getLogger("bios.server")


def slot_of(headers: dict[str, str]) -> tuple[str, int] | None:
    """The (model_id, seq_id) an SDK request names in its headers, or None."""
    run, seq = headers.get(RUN_HEADER), headers.get(SEQ_HEADER)
    if not run or not seq or not seq.isdigit() or len(seq) > 10:
        return None
    return run, int(seq)


class ByteBudget:
    """Bytes of request bodies being read and parsed at once, across all requests.

    A body waits (before any of it is read, so the socket applies backpressure) until its
    bytes fit; one larger than the whole budget waits until nothing else holds any. Six
    55 MB bodies at once no longer add their parsed sizes up in memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._changed: asyncio.Condition | None = None

    async def acquire(self, n: int) -> int:
        if self._changed is None:
            self._changed = asyncio.Condition()
        n = min(n, self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self.held + n <= self.limit)
            self.held += n
        return n

    async def release(self, n: int) -> None:
        assert self._changed is not None
        async with self._changed:
            self.held -= n
            self._changed.notify_all()


def error_response(status: int, detail: str, field: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None,
                   extra: dict[str, Any] | None = None) -> JSONResponse:
    """Bios's error body (`ErrorResponse`: detail, field, code) with a status."""
    body = T.ErrorResponse(detail=detail, field=field, code=code).model_dump(exclude_none=True)
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers)


class RequestGuard:
    """Rejects unauthenticated requests (401), then over-size bodies (413); sets the owner.

    The key is checked first, so that a client without one cannot make the server buffer a
    chunked body.

    A 413 of an ordered training request that names its slot (`RUN_HEADER`, `SEQ_HEADER`)
    is passed to `reject_slot`, which fills the slot with a failed request.

    Args:
        app: the application behind the guard.
        keyring: the server's API keys; with none configured every request is `local`.
        max_body_bytes: the largest request body accepted, declared or chunked.
        reject_slot: async (owner, model_id, seq_id, kind, detail) -> None.
        body_bytes_in_flight: the `ByteBudget` of bodies read at once (default: the limit).
    """

    def __init__(self, app: ASGIApp, keyring: KeyRing, max_body_bytes: int,
                 reject_slot: RejectSlot | None = None,
                 body_bytes_in_flight: int | None = None) -> None:
        self.app = app
        self.keyring = keyring
        self.max_body_bytes = max_body_bytes
        self.reject_slot = reject_slot
        self.budget = ByteBudget(body_bytes_in_flight or max_body_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:  # ASGI names are lower-case; the first of a name wins
            if k in _READ and k.decode("latin-1") not in headers:
                headers[k.decode("latin-1")] = v.decode("latin-1")
        rejection = self._authenticate(scope, headers)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        rejection = self._declared_size(headers)
        if rejection is not None:
            if not await _drain(receive, DRAIN_FACTOR * self.max_body_bytes):
                return  # the client went away
            await self._reject_slot(scope, headers, rejection)
            await rejection(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        chunked = not declared and "transfer-encoding" in headers
        size = int(declared) if declared.isdigit() else 0
        held = 0
        if chunked or size > SMALL_BODY:
            held = await self.budget.acquire(self.max_body_bytes if chunked else size)
        hold = _Hold(self.budget, held)
        try:
            if chunked:
                body, rejection = await self._read_chunked(receive)
                if body is None:
                    return  # disconnected
                receive = replay_body(body, receive)
                if rejection is not None:
                    await self._reject_slot(scope, headers, rejection)
                    await rejection(scope, receive, send)
                    return
            await self.app(scope, receive, hold.releasing(send) if held else send)
        finally:
            await hold.release()

    async def _read_chunked(self, receive: Receive) -> tuple[bytes | None, JSONResponse | None]:
        """Read a chunked body (no length up front), but only up to the limit."""
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                if more and not await _drain(receive, DRAIN_FACTOR * self.max_body_bytes):
                    return None, None
                return b"", error_response(
                    413, f"request body exceeds the limit of {self.max_body_bytes} bytes; "
                    "send smaller batches", None, "too_large")
        return bytes(body), None

    async def _reject_slot(self, scope: Scope, headers: dict[str, str],
                           rejection: JSONResponse) -> None:
        """Fill the seq slot a rejected ordered request names in its headers."""
        kind = ORDERED_ROUTES.get(scope["path"])
        slot = slot_of(headers)
        owner = scope.get("state", {}).get("owner")
        if self.reject_slot is None or kind is None or slot is None or not owner:
            return
        detail = "the request body is larger than this server's limit of " \
            f"{self.max_body_bytes} bytes; send smaller batches"
        try:
            await self.reject_slot(owner, slot[0], slot[1], kind, detail)
        except Exception:  # the 413 still goes out; the slot stays empty (logged)
            log.exception("could not fill the slot of a rejected request")

    def _authenticate(self, scope: Scope, headers: dict[str, str]) -> JSONResponse | None:
        """Set the request's owner, or return the 401 to answer."""
        state = scope.setdefault("state", {})
        if not self.keyring.enabled:
            state["owner"] = LOCAL_OWNER
            return None
        path = scope["path"]
        if path in OPEN_PATHS or ARCHIVE_DOWNLOAD_RE.fullmatch(path) \
                or CONSOLE_FILE_RE.fullmatch(path):
            return None
        key = presented_key(headers)
        tenant = self.keyring.tenant_for(key)
        if tenant is None:
            why = "no API key was sent" if key is None else "the API key is not valid"
            return error_response(
                401, f"{why}: this server requires an API key in the X-API-Key header (or "
                "Authorization: Bearer). Set BIOS_API_KEY or pass api_key= to ServiceClient.",
                None, "unauthorized", {"WWW-Authenticate": "Bearer"})
        state["owner"] = tenant
        return None

    def _declared_size(self, headers: dict[str, str]) -> JSONResponse | None:
        """The 413 to answer when Content-Length is over the limit."""
        size = headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body_bytes:
            return error_response(
                413, f"request body of {size} bytes exceeds the limit of "
                f"{self.max_body_bytes}; send smaller batches", None, "too_large")
        return None


class _Hold:
    """One request's share of the `ByteBudget`, given back once (response start or end)."""

    def __init__(self, budget: ByteBudget, n: int) -> None:
        self.budget = budget
        self.n = n

    async def release(self) -> None:
        n, self.n = self.n, 0
        if n:
            await self.budget.release(n)

    def releasing(self, send: Send) -> Send:
        """send(), releasing the bytes when the response starts: by then the body has been
        parsed and the route has answered."""

        async def send_and_release(message: Message) -> None:
            if message["type"] == "http.response.start":
                await self.release()
            await send(message)

        return send_and_release


async def _drain(receive: Receive, limit: int) -> bool:
    """Read and drop a request body, up to `limit` bytes; False if the client disconnected."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] == "http.disconnect":
            return False
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return True


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields `body` once, then defers to the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
