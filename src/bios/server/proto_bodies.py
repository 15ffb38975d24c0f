"""Protobuf request bodies in, Bios's JSON request bodies out, before the routes see them.

Tinker's SDK posts `forward_backward` as `application/x-protobuf` (zstd-compressed when the
server's client config sets `proto_compress_fwdbwd`), and a forward-only pass is the same route
with `forward_only=true`. This ASGI middleware decodes such a body (wire_proto.py) into the JSON
body of `/api/v1/forward_backward` or `/api/v1/forward`, so that it passes exactly the same
validation, seq-slot and queueing path as a JSON request. It runs inside `RequestGuard`, so the
API key and the body-size limit are checked first.

A body that cannot be decoded gets a 400 naming the field; when its model_id and seq_id can
still be read, its seq slot is filled (via `reject`) so the run's later requests do not wait
for it forever.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from bios.server.http_guard import error_response, replay_body
from bios.server.validation import APIError
from bios.server.wire_proto import PROTOBUF, ProtoDecodeError, decode_forward_backward, peek_ids

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# Called as reject(owner, model_id, seq_id, kind, error) for an undecodable body (may block).
Reject = Callable[[str, str | None, int | None, str, APIError], Awaitable[None]]

FORWARD_BACKWARD = "/api/v1/forward_backward"
FORWARD = "/api/v1/forward"


class ProtobufBodies:
    """Rewrites protobuf `forward_backward` requests into the equivalent JSON requests.

    Args:
        app: the application behind it.
        max_body_bytes: the most bytes a zstd body may expand to.
        reject: fills the seq slot of a request whose body could not be decoded.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, reject: Reject) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != FORWARD_BACKWARD:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if PROTOBUF not in headers.get("content-type", ""):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        owner = str(scope.get("state", {}).get("owner") or "")
        raw = b""
        try:
            raw = self._decompress(bytes(body), headers.get("content-encoding", ""))
            request, forward_only = decode_forward_backward(raw)
        except ProtoDecodeError as e:
            err = APIError(400, f"cannot read the protobuf ForwardBackwardRequest: {e}",
                           e.field, "invalid_request")
            run_id, seq_id = peek_ids(raw)
            if owner:
                await self.reject(owner, run_id, seq_id, "forward_backward", err)
            await error_response(err.status, err.detail, err.field, err.code)(scope, receive,
                                                                              send)
            return
        data = json.dumps(request).encode()
        new_headers = [(k, v) for k, v in scope["headers"]
                       if k not in (b"content-type", b"content-length", b"content-encoding")]
        new_headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(data)).encode())]
        path = FORWARD if forward_only else FORWARD_BACKWARD
        scope = {**scope, "path": path, "raw_path": path.encode(), "headers": new_headers}
        await self.app(scope, replay_body(data, receive), send)

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        encoding = encoding.strip().lower()
        if not encoding or encoding == "identity":
            return body
        if encoding != "zstd":
            raise ProtoDecodeError(f"Content-Encoding {encoding!r} is not supported (zstd or "
                                   "none)")
        import zstandard

        too_big = ProtoDecodeError(f"the zstd body expands past the limit of "
                                   f"{self.max_body_bytes} bytes; send smaller batches")
        try:
            if zstandard.frame_content_size(body) > self.max_body_bytes:
                raise too_big
            # Without a declared size in the frame, the output is capped by max_output_size.
            return zstandard.ZstdDecompressor().decompress(
                body, max_output_size=self.max_body_bytes)
        except zstandard.ZstdError as e:
            raise ProtoDecodeError(f"the zstd body does not decompress: {e}") from e
