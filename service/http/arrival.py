"""uvicorn's httptools protocol, stamping each request with the time its first bytes were
parsed (`scope["state"]["arrived"]`, perf_counter seconds), and bounding its headers.

Under load the event loop runs the request tasks one after another, so a request's task
can start tens of milliseconds after uvicorn parsed it; a clock started in the ASGI
middleware cannot see that wait. With this protocol the `queue` stage and the budget
run from the parse instead (waiting in the kernel's socket buffer for the loop's next
read stays invisible to any server-side clock). Use it with
`uvicorn --http service.http.arrival:ArrivalHttpToolsProtocol` (`ifa-rank serve`, the
image and the bench do); under any other protocol the middleware's clock is used.

Headers: httptools itself accepts any size (8 MB were taken in a test from outside).
Past MAX_HEADER_BYTES (name + value bytes of all headers, as nginx's default buffers
allow) the parse is abandoned: uvicorn answers 400 and closes the connection.
"""

from __future__ import annotations

import time
from typing import Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.middleware import ARRIVED

MAX_HEADER_BYTES: Final = 32 * 1024


class HeadersTooLarge(Exception):
    """Raised from the parser callback: httptools turns it into a parse error."""


class ArrivalHttpToolsProtocol(HttpToolsProtocol):
    _header_bytes = 0

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self.scope["state"][ARRIVED] = time.perf_counter()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise HeadersTooLarge(f"request headers exceed {MAX_HEADER_BYTES} bytes")
        super().on_header(name, value)
