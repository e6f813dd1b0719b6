"""uvicorn's httptools protocol, stamping each request with the time its first bytes were
parsed (`scope["state"]["arrived"]`, perf_counter seconds).

Under load the event loop runs the request tasks one after another, so a request's task
can start tens of milliseconds after uvicorn parsed it; a clock started in the ASGI
middleware cannot see that wait. With this protocol the `queue` stage and the budget
run from the parse instead (waiting in the kernel's socket buffer for the loop's next
read stays invisible to any server-side clock). Use it with
`uvicorn --http service.http.arrival:ArrivalHttpToolsProtocol` (`ifa-rank serve`, the
image and the bench do); under any other protocol the middleware's clock is used.
"""

from __future__ import annotations

import time

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.http.middleware import ARRIVED


class ArrivalHttpToolsProtocol(HttpToolsProtocol):
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["state"][ARRIVED] = time.perf_counter()
