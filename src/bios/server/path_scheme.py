"""Checkpoint paths in the form the client uses: `tinker://` for Tinker's SDK, else `bios://`.

Bios names checkpoints `bios://<run>/weights/<name>` and accepts `tinker://` everywhere too.
Tinker's official SDK (and code written for it) expects `tinker://` paths back: it parses them
(`ParsedCheckpointTinkerPath`) and users' code compares prefixes. So for requests from that SDK
(its User-Agent is `Tinker/Python <version>` or `AsyncTinker/Python <version>`) this ASGI
middleware rewrites the scheme of every path in JSON responses. The store and the `bios` SDK
keep `bios://`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OURS, THEIRS = b'"bios://', b'"tinker://'


def is_tinker_sdk(user_agent: str) -> bool:
    """True for the User-Agent of Tinker's official SDK (sync or async client)."""
    return user_agent.startswith(("Tinker/", "AsyncTinker/"))


class TinkerPathScheme:
    """Rewrites `"bios://` to `"tinker://` in JSON responses to Tinker's SDK."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        agent = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"user-agent"), "")
        if not is_tinker_sdk(agent):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                ctype = next((v for k, v in message.get("headers", [])
                              if k.lower() == b"content-type"), b"")
                if b"json" in ctype:
                    start = message  # hold it: Content-Length changes with the body
                    return
                await send(message)
                return
            if message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = b"".join(chunks).replace(OURS, THEIRS)
                headers = [(k, v) for k, v in start.get("headers", [])
                           if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            await send(message)

        await self.app(scope, receive, rewrite)
