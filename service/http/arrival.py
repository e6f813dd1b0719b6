"""uvicorn's httptools protocol, stamping each request with the time its first bytes were
parsed (`scope["state"]["arrived"]`, perf_counter seconds), bounding its headers, the time
a request head may take, and the connections a process holds.

Under load the event loop runs the request tasks one after another, so a request's task
can start tens of milliseconds after uvicorn parsed it; a clock started in the ASGI
middleware cannot see that wait. With this protocol the `queue` stage and the budget
run from the parse instead (waiting in the kernel's socket buffer for the loop's next
read stays invisible to any server-side clock). Use it with
`uvicorn --http service.http.arrival:ArrivalHttpToolsProtocol` (`ifa-rank serve`, the
image and the bench do); under any other protocol the middleware's clock is used, and
the connection bounds below do not apply.

Headers: httptools itself accepts any size (8 MB were taken in a test from outside).
Past MAX_HEADER_BYTES (name + value bytes of all headers, as nginx's default buffers
allow) the parse is abandoned: uvicorn answers 400 and closes the connection.

Idle and slow connections: uvicorn arms its keep-alive timer only after a response, and
stops it at the next byte, so a connection that never completes a request head (sends
nothing, or a byte of headers now and then) was held forever. Here a connection must
complete its first request head within IFA_HEADER_TIMEOUT_S of connecting, and a later
one within IFA_HEADER_TIMEOUT_S of its first byte; else it is closed (with a 408 when a
request had begun). Between requests uvicorn's keep-alive timeout still closes an idle
connection. Past IFA_MAX_CONNECTIONS open connections in this process, a new one is
answered 503 (`Retry-After: 1`, `Connection: close`) and closed at once.

One of several workers (`ifa-rank serve --workers N`, IFA_BALANCE_CONNECTIONS): a
connection counts in this worker's slot of the workers' ledger from connect to close; one
accepted over this worker's fair share is passed, before a byte is read, to the worker
furthest under its share (service/http/handoff.py; `HandoffAdopter` serves those passed
here), and a worker over its share answers a request with `Connection: close` so the
client reconnects (service/http/worker_share.py).

A response's head and body leave in one send (`service/http/cork.py`): uvicorn writes
them separately, which cost a second send and a second wake-up of the client for each
answer.

The head deadline costs nothing per request: one timer per connection, armed when it is
made, looks at the connection's state when it fires (a request in flight, a head begun
and when, idle after a response) and either closes it or re-arms itself, at most about
once per timeout while the connection lives. The parser callbacks are not touched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server

from service.http import handoff, worker_share
from service.http.cork import CorkedTransport
from service.http.middleware import ARRIVED, error_response
from service.settings import Settings

MAX_HEADER_BYTES: Final = 32 * 1024
REFUSED_LOG_EVERY_S: Final = 10.0

log = logging.getLogger(__name__)


class HeadersTooLarge(Exception):
    """Raised from the parser callback: httptools turns it into a parse error."""


class ArrivalHttpToolsProtocol(HttpToolsProtocol):
    _header_bytes = 0

    # IFA_HEADER_TIMEOUT_S and IFA_MAX_CONNECTIONS, read once per process by the first
    # connection. uvicorn builds the protocol itself (config, server_state, app_state,
    # loop): nothing of the app's Settings reaches it, and the environment must not be
    # read at import. The service's Settings (the app factory built them from the same
    # environment, so they are valid) keep one definition, default and bound per value.
    _limits: ClassVar[tuple[float, int] | None] = None
    _refused = 0  # connections refused over the cap since the last warning (class-wide)
    _refused_logged_at = 0.0

    _head_timer: asyncio.TimerHandle | None = None
    _made_at = 0.0  # perf_counter at connection_made
    _idle_cycle: object = None  # the answered cycle after which stray bytes were seen
    _idle_since = 0.0
    _counted = False  # in this worker's open connections in the ledger
    _accepted_over = False  # accepted over this worker's share: its first request asks
    _leaving = False  # its answer says `Connection: close` (moved to another worker)
    _adopted = False  # passed here by another worker (service/http/handoff.py)
    _close_first = False  # adopted while this worker stops: its first answer closes it
    _handed_off = False  # passed to another worker before anything was read

    @classmethod
    def limits(cls) -> tuple[float, int]:
        if cls._limits is None:
            settings = Settings()
            cls._limits = (settings.header_timeout_s, settings.max_connections)
        return cls._limits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ledger = worker_share.joined()
        if ledger is not None and not self._adopted and self._hand_off(ledger, transport):
            return
        super().connection_made(transport)
        # every write of the connection through it: a response's head and body in one send
        self.transport = CorkedTransport(transport, self.loop)  # type: ignore[assignment]
        timeout, cap = self.limits()
        if len(self.connections) > cap:
            self._refuse()
            return
        self._made_at = time.perf_counter()
        self._head_timer = self.loop.call_later(timeout, self._check_head)
        # one of several workers (IFA_BALANCE_CONNECTIONS): see service/http/worker_share.py
        ledger = worker_share.joined()
        if ledger is not None:
            ledger.opened()
            self._counted = True
            self._accepted_over = not self._adopted and ledger.excess(self._made_at) > 0

    def _hand_off(
        self, ledger: worker_share.ConnectionLedger, transport: asyncio.Transport
    ) -> bool:
        """Pass a connection accepted over this worker's share to the worker furthest
        under it (service/http/handoff.py), before uvicorn sees it; False to keep it."""
        now = time.perf_counter()
        target = ledger.handoff_target(now)
        if target is None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or not handoff.send(sock.fileno(), target):
            return False
        ledger.passed(target, now)
        self._handed_off = True
        if ledger.on_handoff is not None:
            ledger.on_handoff()
        transport.close()  # this process's descriptor only: the connection lives on there
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handed_off:
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        ledger = worker_share.joined()
        if self._counted and ledger is not None:
            ledger.closed(self._leaving)
        self._counted = self._leaving = False
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self.scope["state"][ARRIVED] = time.perf_counter()

    def on_headers_complete(self) -> None:
        before = self.cycle
        super().on_headers_complete()
        ledger = worker_share.joined()
        cycle = self.cycle
        if self._counted and ledger is not None and cycle is not before and cycle is not None:
            accepted_over, self._accepted_over = self._accepted_over, False
            now = self.scope["state"][ARRIVED]
            close_first, self._close_first = self._close_first, False
            if not self._leaving and (close_first or ledger.should_close(accepted_over, now)):
                # uvicorn answers `connection: close` and closes after this response
                cycle.keep_alive = False
                self._leaving = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise HeadersTooLarge(f"request headers exceed {MAX_HEADER_BYTES} bytes")
        super().on_header(name, value)

    # --- the connection bounds

    def _check_head(self) -> None:
        """The head timer: close a connection whose request head is overdue, else re-arm."""
        self._head_timer = None
        transport = self.transport
        if transport.is_closing() or transport.get_protocol() is not self:  # or upgraded
            return
        timeout = self.limits()[0]
        now = time.perf_counter()
        cycle, scope = self.cycle, self.scope
        since: float | None
        began = False
        if cycle is not None and not cycle.response_complete:
            # A request in flight (a pipelined one included): its body is bounded by
            # IFA_BODY_TIMEOUT_S, its work by the budget.
            since = None
        elif cycle is None:
            # No head completed yet: the first is due within the timeout of connecting.
            since, began = self._made_at, scope is not None
        elif cycle.scope is not scope:
            # The next request began (its first byte parsed) and its head is incomplete.
            since, began = scope["state"][ARRIVED], True
        elif self.timeout_keep_alive_task is not None:
            since = None  # idle after a response: uvicorn's keep-alive timer closes it
        else:
            # Bytes came after the response (which stops uvicorn's keep-alive timer) but
            # began no request (llhttp skips blank lines): due from when first seen here.
            if self._idle_cycle is not cycle:
                self._idle_cycle, self._idle_since = cycle, now
            since = self._idle_since
        if since is None:
            self._head_timer = self.loop.call_later(timeout, self._check_head)
        elif now - since < timeout:
            self._head_timer = self.loop.call_later(since + timeout - now, self._check_head)
        else:
            if began:
                self._answer_and_close(
                    408, f"request head not received within {timeout:g} s (IFA_HEADER_TIMEOUT_S)"
                )
            else:
                transport.close()

    def _refuse(self) -> None:
        """Over IFA_MAX_CONNECTIONS: 503 and close, before anything is read. (A client
        whose request already arrived may see a reset instead of the 503.)"""
        self.connections.discard(self)  # the count is of the connections kept
        self._answer_and_close(
            503,
            f"too many connections (IFA_MAX_CONNECTIONS={self.limits()[1]}); retry later",
            (b"retry-after", b"1"),
        )
        cls = type(self)
        cls._refused += 1
        now = time.monotonic()
        if now - cls._refused_logged_at >= REFUSED_LOG_EVERY_S:
            log.warning(
                "refused %d connection(s) over IFA_MAX_CONNECTIONS=%d (since the last such warning)",
                cls._refused,
                self.limits()[1],
            )
            cls._refused, cls._refused_logged_at = 0, now

    def _answer_and_close(self, status: int, detail: str, *headers: tuple[bytes, bytes]) -> None:
        """The app's error answer (`error_response`), written before (or instead of) any
        request reaching the app, then close."""
        answer = error_response(status, detail)
        lines: list[bytes] = [b"HTTP/1.1 %d %s" % (status, _PHRASES[status])]
        lines += [b"%s: %s" % h for h in (*self.server_state.default_headers, *headers)]
        lines += [
            b"content-type: %s" % str(answer.media_type).encode(),
            b"content-length: %d" % len(answer.body),
            b"connection: close",
            b"",
            bytes(answer.body),
        ]
        self.transport.write(b"\r\n".join(lines))
        self.transport.close()


_PHRASES: Final = {408: b"Request Timeout", 503: b"Service Unavailable"}


class HandoffAdopter:
    """Serves the connections sibling workers pass to this one, as uvicorn's `server`
    serves those it accepts: the same protocol, config, connection set (so a graceful
    shutdown waits for them too) and lifespan state."""

    def __init__(
        self,
        server: Server,
        protocol_class: type[ArrivalHttpToolsProtocol],
        loop: asyncio.AbstractEventLoop,
        stopping: Callable[[], bool],
    ) -> None:
        self.server, self.protocol_class, self.loop = server, protocol_class, loop
        self.stopping = stopping  # the app's drain has begun
        self._pending: set[asyncio.Task[Any]] = set()

    def __call__(self, sock: socket.socket) -> None:
        # Passed here while this worker drains or stops: serve the request its client
        # sent, then close, as with the connections it had; and take no more (a sibling's
        # next send fails and it keeps the connection), else each of its clients would
        # come back, be passed here again and be closed again until this worker is gone.
        closing = self.server.should_exit or self.stopping()
        if closing:
            stop_handoffs()
        protocol = partial(self._protocol, closing)
        task = self.loop.create_task(self.loop.connect_accepted_socket(protocol, sock))
        self._pending.add(task)
        task.add_done_callback(lambda t: self._adopted(t, sock))

    def _protocol(self, closing: bool) -> ArrivalHttpToolsProtocol:
        server = self.server
        protocol = self.protocol_class(
            config=server.config, server_state=server.server_state, app_state=server.lifespan.state
        )
        protocol._adopted = True
        protocol._close_first = closing
        return protocol

    def _adopted(self, task: asyncio.Task[Any], sock: socket.socket) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("connection handoff: could not serve a connection", exc_info=task.exception())
            sock.close()


_receiver: handoff.Receiver | None = None


def receive_handoffs(stopping: Callable[[], bool] = lambda: False) -> bool:
    """At a worker's start-up, in its event loop, after joining the ledger: take the
    connections sibling workers pass here (until `stopping()`: the app's drain). uvicorn gives the app no handle on its server;
    its SIGTERM handler is the server's bound method (uvicorn installs it with
    signal.signal for the whole run, as `drain_on_sigterm` relies on too). False (others
    keep their connections and send them away with `Connection: close`) where none is
    found or the address is taken."""
    global _receiver
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if _receiver is not None or not isinstance(server, Server):
        return False
    protocol_class = server.config.http_protocol_class
    if not issubclass(protocol_class, ArrivalHttpToolsProtocol):
        return False  # only this protocol passes connections on; its siblings run the same
    loop = asyncio.get_running_loop()
    try:
        _receiver = handoff.Receiver(
            os.getpid(), HandoffAdopter(server, protocol_class, loop, stopping)
        )
    except OSError as e:
        log.warning("connection handoff off in this worker: %s", e)
        return False
    _receiver.start(loop)
    return True


def stop_handoffs() -> None:
    """At shutdown: stop listening; a sibling's send fails from then on and it keeps
    the connection."""
    global _receiver
    if _receiver is not None:
        _receiver.close()
        _receiver = None
