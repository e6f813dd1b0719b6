"""A connection passed to another worker as it is (service/http/handoff.py): the socket
crosses by SCM_RIGHTS, the receiver serves it, bytes the client sent before the handoff
are still there, and the sender's copy closing does not end it."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from service.http import handoff


def tcp_connection() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection: (the client's end, the accepted end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


def test_a_passed_connection_keeps_its_bytes_and_lives_on_at_the_receiver() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        got: asyncio.Queue[socket.socket] = asyncio.Queue()
        name = os.getpid() + 4_000_000  # an address of its own, whatever else this process binds
        receiver = handoff.Receiver(name, got.put_nowait)
        receiver.start(loop)
        try:
            client, accepted = tcp_connection()
            with client:
                client.sendall(b"sent before the handoff")
                assert handoff.send(accepted.fileno(), name)
                accepted.close()  # the sender's descriptor only
                adopted = await asyncio.wait_for(got.get(), 5)
                with adopted:
                    adopted.settimeout(5)
                    assert adopted.recv(100) == b"sent before the handoff"
                    adopted.sendall(b"answered by the receiver")
                    client.settimeout(5)
                    assert client.recv(100) == b"answered by the receiver"
        finally:
            receiver.close()

    asyncio.run(run())


def test_nothing_is_sent_where_no_worker_listens() -> None:
    with socket.socket() as sock:
        assert handoff.send(sock.fileno(), os.getpid() + 5_000_000) is False
    # a closed receiver no longer takes any
    name = os.getpid() + 6_000_000
    receiver = handoff.Receiver(name, lambda s: None)
    receiver.close()
    with socket.socket() as sock:
        assert handoff.send(sock.fileno(), name) is False


def test_only_tcp_sockets_are_taken() -> None:
    async def run() -> None:
        taken: list[socket.socket] = []
        name = os.getpid() + 7_000_000
        receiver = handoff.Receiver(name, taken.append)
        receiver.start(asyncio.get_running_loop())
        try:
            left, right = socket.socketpair()  # a Unix stream socket: not a client connection
            with left, right:
                assert handoff.send(left.fileno(), name)
            for _ in range(100):
                if receiver.refused:
                    break
                await asyncio.sleep(0.01)
            assert (receiver.refused, taken) == (1, [])
        finally:
            receiver.close()

    asyncio.run(run())


def test_a_connection_passed_to_a_draining_worker_is_served_once_and_no_more_are_taken(
    tmp_path: Path,
) -> None:
    """The adopter of a worker whose drain has begun: the request the client sent is
    answered, with `Connection: close`, and the worker stops taking connections."""
    import uvicorn

    from service.http import arrival, worker_share

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"6")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"served"})

    async def run() -> None:
        loop = asyncio.get_running_loop()
        config = uvicorn.Config(app, http=arrival.ArrivalHttpToolsProtocol, lifespan="off")
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)  # as Server.serve sets it
        adopter = arrival.HandoffAdopter(
            server, arrival.ArrivalHttpToolsProtocol, loop, stopping=lambda: True
        )
        receiver = arrival._receiver = handoff.Receiver(os.getpid() + 8_000_000, adopter)
        receiver.start(loop)
        try:
            client, accepted = tcp_connection()
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            accepted.setblocking(False)
            adopter(accepted)
            assert arrival._receiver is None  # stopped: a sibling's next send fails
            answer = b""
            with client:
                client.setblocking(False)
                while not answer.endswith(b"served"):
                    answer += await asyncio.wait_for(loop.sock_recv(client, 1024), 5)
                assert await asyncio.wait_for(loop.sock_recv(client, 1024), 5) == b""
            head = answer.split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 200") and b"connection: close" in head
        finally:
            arrival.stop_handoffs()

    worker_share.join(str(tmp_path))
    try:
        asyncio.run(run())
    finally:
        worker_share.leave()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="sending as another user needs root (CI runs as root)"
)
def test_a_socket_sent_by_another_user_is_not_taken() -> None:
    """An abstract address has no file permissions: any local process can send to it."""
    name = os.getpid() + 9_000_000
    taken: list[socket.socket] = []
    receiver = handoff.Receiver(name, taken.append)  # bound: messages wait in its queue
    try:
        pid = os.fork()
        if pid == 0:  # the child: nobody, sending a TCP socket of its own
            code = 1
            try:
                os.setuid(65534)
                theirs = socket.socket()  # held: a temporary's descriptor number is reused
                code = 0 if handoff.send(theirs.fileno(), name) else 2
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
        mine = socket.socket()
        assert handoff.send(mine.fileno(), name)  # and one from this user
        mine.close()

        async def receive() -> None:
            receiver.start(asyncio.get_running_loop())
            for _ in range(200):
                if taken:
                    break
                await asyncio.sleep(0.01)

        asyncio.run(receive())
        assert (receiver.refused, len(taken)) == (1, 1)
        taken[0].close()
    finally:
        receiver.close()
