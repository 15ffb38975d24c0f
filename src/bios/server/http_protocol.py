"""uvicorn's HTTP/1.1 protocol with the request head (line + headers) bounded.

httptools buffers a header until it ends, so four connections sending 100 MiB headers each
grew the server by 450 MiB before any route (or the API key check) ran. Here the bytes of a
request's head and its number of headers are counted as they arrive; past a bound the
connection gets a 431 and is closed, before auth and before the app sees the request.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Bounds of one request's head; generous for real clients (httpx sends ~10 short headers),
# the same order as nginx's and Node's defaults.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100


class BoundedHttpProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that answers 431 and closes when a request head is over-size.

    `max_header_bytes` bounds the bytes received while a request's head is incomplete
    (request line and headers), `max_headers` the number of header lines.
    """

    max_header_bytes = MAX_HEADER_BYTES
    max_headers = MAX_HEADERS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a request head is being received (or the next one awaited)
        self._head_bytes = 0
        self._header_count = 0
        self._rejected = False

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after feeding: the chunk that ends a head may carry body bytes too.
        if self._in_head and (self._head_bytes > self.max_header_bytes
                              or self._header_count > self.max_headers):
            self._reject_head()

    def on_message_begin(self) -> None:
        self._header_count = 0
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= self.max_headers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._header_count > self.max_headers:
            return  # data_received answers 431 once feeding returns; start no app task
        self._in_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self._header_count <= self.max_headers:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._header_count > self.max_headers:
            return
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def _reject_head(self) -> None:
        self._rejected = True
        msg = (f"request headers exceed this server's limit ({self.max_header_bytes} bytes, "
               f"{self.max_headers} headers)").encode()
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(msg)).encode() + b"\r\n",
            b"connection: close\r\n\r\n", msg]))
        self.transport.close()
