"""A just-accepted connection passed to another worker process, as it is.

The workers of `ifa-rank serve --workers N` accept from one listening socket, and the
kernel does not pick among them at random: with the workers idle, the same one wins
nearly every new connection (16 opened at once landed 15/1 and 16/0). A worker over its
share that answers `Connection: close` (service/http/worker_share.py) then gets its
client's reconnect back, again and again: in a CI run one worker stayed at its share
while two connections bounced off it for 40 rounds of requests.

So a worker that accepts a connection over its share passes it on before reading a byte:
the socket goes, by `SCM_RIGHTS` over a Unix datagram socket, to the worker furthest
under its share, which serves it as if it had accepted it. The client sees nothing (no
reconnect, no extra round trip); request bytes already sent wait in the socket's buffer.
Each worker listens on an abstract-namespace address named for its pid (no file, gone
with the process). A send that fails (the worker gone, not listening, its queue full)
leaves the connection where it is, and the `Connection: close` path still applies.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_FDS_PER_MESSAGE = 16
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(_UCRED.size)


def address(pid: int) -> bytes:
    """The worker `pid`'s handoff address (Linux abstract namespace: a leading NUL)."""
    return b"\0ifa-rank-handoff-%d" % pid


def send(fd: int, pid: int) -> bool:
    """Pass a duplicate of `fd` to the worker `pid`. False (nothing sent) when it is not
    listening or cannot take it now; the caller keeps the connection then."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as tx:
            tx.setblocking(False)  # never wait on a peer's full queue from the event loop
            rights = array.array("i", [fd])
            tx.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, address(pid))
    except OSError:  # ECONNREFUSED (not listening), EAGAIN (queue full), ...
        return False
    return True


class Receiver:
    """This worker's handoff address, read by the event loop: each socket received is
    given to `adopt` (which owns it from then on). An abstract address has no file
    permissions, so the kernel's credentials of each message are checked: only a process
    of this user is heard, and only TCP sockets are taken."""

    def __init__(self, pid: int, adopt: Callable[[socket.socket], None]) -> None:
        self.adopt = adopt
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(address(pid))
        except OSError:
            self._sock.close()
            raise
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.refused = 0  # messages or sockets not taken (another user's, not TCP)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._sock.fileno(), self._receive)

    def _receive(self) -> None:
        while self._loop is not None:  # not closed by an `adopt` of this round
            try:
                _, ancdata, _, _ = self._sock.recvmsg(16, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                log.exception("connection handoff: receive failed")
                return
            fds: list[int] = []
            uid = None
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(data) - len(data) % 4
                    fds += array.array("i", data[:usable])
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    uid = _UCRED.unpack(data[: _UCRED.size])[1]
            for fd in fds:
                self._take(fd, trusted=uid == os.getuid())

    def _take(self, fd: int, trusted: bool) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:  # not a socket
            os.close(fd)
            self.refused += 1
            return
        if not trusted or sock.type != socket.SOCK_STREAM or sock.family not in _TCP:
            sock.close()
            self.refused += 1
            return
        try:
            self.adopt(sock)
        except Exception:
            log.exception("connection handoff: could not adopt a connection")
            sock.close()

    def close(self) -> None:
        """Stop listening; a connection sent meanwhile is closed with the socket."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._loop = None
        self._sock.close()


_TCP = (socket.AF_INET, socket.AF_INET6)
