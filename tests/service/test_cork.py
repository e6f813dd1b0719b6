"""A response's head and body in one send (service/http/cork.py), on a real event loop and
a real socket pair: the head waits for its body and both go out in one `writelines`; a
head alone goes out on the loop's next turn; bytes keep their order through every path;
(uvicorn under the service's protocol: tests/e2e/test_one_send.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvloop

from service.http.cork import CorkedTransport

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"


class Recording:
    """A real transport, with the calls made to it written down."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.calls: list[tuple[str, list[bytes]]] = []

    def write(self, data: bytes) -> None:
        self.calls.append(("write", [bytes(data)]))
        self.transport.write(data)

    def writelines(self, data: Any) -> None:
        parts = [bytes(d) for d in data]
        self.calls.append(("writelines", parts))
        self.transport.writelines(parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


@asynccontextmanager
async def corked() -> AsyncIterator[tuple[CorkedTransport, Recording, socket.socket]]:
    ours, peer = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
    recording = Recording(transport)
    try:
        yield CorkedTransport(recording, loop), recording, peer  # type: ignore[arg-type]
    finally:
        transport.close()
        peer.close()


def received(peer: socket.socket, size: int) -> bytes:
    peer.settimeout(5)
    out = b""
    while len(out) < size:
        chunk = peer.recv(65536)
        assert chunk, "closed early"
        out += chunk
    return out


def test_a_head_goes_out_with_its_body_in_one_writelines() -> None:
    async def main() -> None:
        async with corked() as (cork, recording, peer):
            cork.write(HEAD)
            assert recording.calls == []  # held
            cork.write(b"body")
            assert recording.calls == [("writelines", [HEAD, b"body"])]
            await asyncio.sleep(0)  # the flush scheduled for the head finds nothing
            assert len(recording.calls) == 1
            assert received(peer, len(HEAD) + 4) == HEAD + b"body"

    asyncio.run(main())


def test_a_head_alone_goes_out_on_the_next_turn_in_order() -> None:
    async def main() -> None:
        async with corked() as (cork, recording, peer):
            cork.write(HEAD)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert recording.calls == [("write", [HEAD])]
            cork.write(b"bo")  # not a head: through at once
            cork.writelines([b"d", b"y"])
            assert recording.calls[1:] == [("write", [b"bo"]), ("writelines", [b"d", b"y"])]
            assert received(peer, len(HEAD) + 4) == HEAD + b"body"

    asyncio.run(main())


def test_close_and_other_writes_send_a_held_head_first() -> None:
    async def main() -> None:
        async with corked() as (cork, recording, peer):
            cork.write(HEAD)
            cork.writelines([b"bo", b"dy"])
            assert recording.calls == [("write", [HEAD]), ("writelines", [b"bo", b"dy"])]
            cork.write(HEAD)
            cork.close()
            assert recording.calls[-1] == ("write", [HEAD])
            assert cork.is_closing()
            assert received(peer, 2 * len(HEAD) + 4) == HEAD + b"body" + HEAD

    asyncio.run(main())


def test_an_aborted_connection_drops_what_is_held() -> None:
    async def main() -> None:
        async with corked() as (cork, recording, _):
            cork.write(HEAD)
            cork.abort()
            await asyncio.sleep(0)
            assert recording.calls == []
            assert cork.is_closing()
            assert cork.get_extra_info("socket") is not None  # the rest passes through

    asyncio.run(main())


def test_under_uvloop_an_answer_leaves_at_its_body_write() -> None:
    # the request's bookkeeping runs after the answer's write (service/http/answered.py),
    # which helps the client only if the write sends: the bytes must be in the peer's
    # socket when the body's write returns, before the loop turns
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=ours)
        try:
            cork = CorkedTransport(transport, loop)
            cork.write(HEAD)
            cork.write(b"body" * 5000)  # an answer of 20 kB, as at M = 500
            return peer.recv(1 << 20)  # raises BlockingIOError when nothing was sent
        finally:
            transport.close()
            peer.close()

    assert uvloop.run(main()) == HEAD + b"body" * 5000
