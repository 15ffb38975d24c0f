"""The checks every HTTP request passes before a route: API key, then body size.

A plain ASGI middleware, not Starlette's `BaseHTTPMiddleware`: that one runs each request's
route in an extra task with memory streams between them, and on a busy 2-core server it was
the largest share of the event loop's time (profiled in docs/benchmarks.md). Here a request
costs a header lookup and one dict write (`scope["state"]["owner"]`, read back as
`request.state.owner`).
"""

from __future__ import annotations

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
_READ = frozenset({b"content-length", b"transfer-encoding", b"x-api-key", b"authorization"})


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

    Args:
        app: the application behind the guard.
        keyring: the server's API keys; with none configured every request is `local`.
        max_body_bytes: the largest request body accepted, declared or chunked.
    """

    def __init__(self, app: ASGIApp, keyring: KeyRing, max_body_bytes: int) -> None:
        self.app = app
        self.keyring = keyring
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:  # ASGI names are lower-case; the first of a name wins
            if k in _READ and k.decode("latin-1") not in headers:
                headers[k.decode("latin-1")] = v.decode("latin-1")
        rejection = self._authenticate(scope, headers) or self._declared_size(headers)
        if rejection is None and "content-length" not in headers \
                and "transfer-encoding" in headers:
            # A chunked body has no length up front: read it here, but only up to the limit,
            # then hand the route a receive() that replays it.
            body = bytearray()
            more = True
            while more and rejection is None:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    rejection = error_response(
                        413, f"request body exceeds the limit of {self.max_body_bytes} bytes; "
                        "send smaller batches", None, "too_large")
            receive = _replay(bytes(body), receive)
        if rejection is not None:
            await rejection(scope, receive, send)
        else:
            await self.app(scope, receive, send)

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


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields `body` once, then defers to the real one (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
