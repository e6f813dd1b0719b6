"""Connections spread evenly over the worker processes of `ifa-rank serve --workers N`.

uvicorn's workers accept from one listening socket, and whichever worker's loop polls
first takes a new connection. A client that opens its connections at once (a pool, a
load balancer, wrk) lands them unevenly: 16 connections over 2 workers were 4/12, 6/10
and 8/8 in three runs, and 15/1 when opened while one worker was still starting; they
stay where they landed for as long as they live. The fuller worker queues each request
behind more of them, or, for a few long-lived connections from a proxy, one worker
idles. Two moves even them out:

* a worker that accepts a connection that would put it over its fair share passes it,
  before reading a byte, to the worker furthest under its share (service/http/handoff.py:
  the socket crosses by SCM_RIGHTS; the client sees nothing);
* a worker over its share with connections it already serves (placed before a worker
  joined, or left uneven by clients closing theirs) answers a request with
  `Connection: close`: the client reads the answer and reconnects (nothing is refused,
  nothing lost), and the new connection goes to whichever worker accepts it, which
  passes it on in turn if over its share. Without the first move the reconnect could
  bounce: with the workers idle the kernel hands new connections to the same one nearly
  every time, and a CI run saw two bounce off a worker at its share for 40 rounds.

The fair share is the open connections of all workers over the number of workers,
rounded up, taking for the total the largest seen in the last PEAK_S (2 s): a connection
sent away is gone from every count until its client reconnects at its next request, and
a share computed without it would send away more than the excess. The connections a
worker has chosen to close no longer count in its own number. A worker asks at the first
request of a connection it accepted while over its share (and could not pass on), and
at most once a second (CHECK_S) at any request; while more than one is over, every
request asks. A connection passed to a worker counts there for the sender at once, until
that worker's own count shows it (or PEAK_S): a burst of new connections would otherwise
all go to the same one before its loop counted any.

Each worker publishes its open connections in the ledger, a 1 KiB file in the workers'
shared directory (the Prometheus multiprocess directory that `ifa-rank serve` prepares):
one slot per worker, (pid, open connections) as two int64, taken at start-up. A worker
writes only its own slot, from its event loop; the others read it when they ask. A slot
whose process is gone (killed without clearing it) is cleared by the first worker that
asks and finds the process gone, and taken by the next worker that starts.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

SLOTS: Final = 64
CHECK_S: Final = 1.0  # a worker compares its share at most this often (besides new connections)
PEAK_S: Final = 2.0  # the total that sets the share: the largest seen this long ago or since
LEDGER_FILE: Final = "connections.ledger"
_SIZE: Final = SLOTS * 2 * 8


class ConnectionLedger:
    """This worker's slot in the ledger at `path` (made if missing), claimed for `pid`."""

    def __init__(
        self,
        path: Path,
        pid: int | None = None,
        on_move: Callable[[], None] | None = None,
        on_handoff: Callable[[], None] | None = None,
    ) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.on_move = on_move  # called for each connection sent away (a metric)
        self.on_handoff = on_handoff  # for each one passed to another worker (a metric)
        # kept open for the lock: taking a slot, and clearing a dead worker's, hold it
        self._fd = fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with _locked(fd):
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
            # int64 view: slot i is [2i] = pid (0: free), [2i + 1] = open connections
            self._cells = memoryview(self._map).cast("q")
            self.slot = self._claim()
        self.open = 0  # connections open in this worker
        self.leaving = 0  # of which, answered with `Connection: close`, not yet gone
        self._next_check = 0.0
        self._peak = 0  # the largest total seen lately, and when (perf_counter s)
        self._peak_at = 0.0
        # connections passed to a worker that may not have counted them yet: pid ->
        # (its count when the first was sent, how many sent since, when the last went)
        self._passed: dict[int, tuple[int, int, float]] = {}
        self._target_held = 0

    def _claim(self) -> int:
        cells = self._cells
        free = None
        for i in range(SLOTS):
            pid = cells[2 * i]
            if pid == self.pid:
                free = i
                break
            if free is None and (pid == 0 or not _alive(pid)):
                free = i
        if free is None:
            raise RuntimeError(f"connection ledger full: more than {SLOTS} workers")
        cells[2 * free], cells[2 * free + 1] = self.pid, 0
        return free

    def opened(self) -> None:
        self.open += 1
        self._publish()

    def closed(self, leaving: bool) -> None:
        self.open -= 1
        self.leaving -= leaving
        self._publish()

    def _publish(self) -> None:
        if self._cells[2 * self.slot] == self.pid:  # not after release (connections close late)
            self._cells[2 * self.slot + 1] = self.open

    def excess(self, now: float) -> int:
        """Connections this worker holds over the fair share (0 when within it, or alone).
        Slots of processes found gone are cleared on the way (a signal-0 probe each)."""
        share, _ = self._survey(now)
        return 0 if share is None else max(0, self.open - self.leaving - share)

    def handoff_target(self, now: float) -> int | None:
        """For a connection just accepted (not yet counted): the pid of the worker to pass
        it to (service/http/handoff.py), the one furthest under its share, when taking it
        would put this worker over its share; None to keep it."""
        share, others = self._survey(now, extra=1)
        if share is None or self.open + 1 - self.leaving <= share:
            return None
        held, pid = min(others)
        if held >= share:
            return None
        self._target_held = held  # its count before anything is sent (see passed)
        return pid

    def passed(self, pid: int, now: float) -> None:
        """A connection was passed to worker `pid` (the last `handoff_target`, at `now`):
        it counts there from now on, even
        before that worker's loop gets to it and counts it itself (a burst of new
        connections would otherwise all go to the same one)."""
        base, sent, _ = self._passed.get(pid, (self._target_held, 0, now))
        self._passed[pid] = (base, sent + 1, now)

    def _survey(self, now: float, extra: int = 0) -> tuple[int | None, list[tuple[int, int]]]:
        """The fair share (None while this worker is alone), with `extra` connections
        about to open here, and the other workers' (open connections, pid)."""
        cells = self._cells
        total = workers = 0
        others = []
        for i in range(SLOTS):
            pid = cells[2 * i]
            if pid == 0:
                continue
            if pid != self.pid:
                if not _alive(pid):
                    self._clear_dead(i, pid)
                    continue
                held = cells[2 * i + 1]
                if pid in self._passed:
                    base, sent, at = self._passed[pid]
                    if held >= base + sent or now - at > PEAK_S:
                        del self._passed[pid]  # counted there (or closed meanwhile)
                    else:
                        held = base + sent
                others.append((held, pid))
                total += held
            else:
                total += cells[2 * i + 1]
            workers += 1
        if workers < 2:
            return None, others
        total += extra
        if total >= self._peak or now - self._peak_at > PEAK_S:
            self._peak, self._peak_at = total, now
        return -(-self._peak // workers), others

    def _clear_dead(self, i: int, pid: int) -> None:
        # under the lock, and only if still that pid: a worker starting now may have
        # just taken the slot
        with _locked(self._fd):
            if self._cells[2 * i] == pid:
                self._cells[2 * i], self._cells[2 * i + 1] = 0, 0

    def should_close(self, accepted_over: bool, now: float) -> bool:
        """At a request's start (`now`: perf_counter s): answer it with `Connection: close`?
        `accepted_over`: the connection's first request, and it was accepted while this
        worker was over its share. Counts the connection as leaving when so."""
        if not accepted_over and now < self._next_check:
            return False
        excess = self.excess(now)
        # more than one over: ask again at the next request, not a second later
        self._next_check = now if excess > 1 else now + CHECK_S
        if excess == 0:
            return False
        self.leaving += 1
        if self.on_move is not None:
            self.on_move()
        return True

    def release(self) -> None:
        """Clear this worker's slot (at exit)."""
        if self._cells[2 * self.slot] == self.pid:
            self._cells[2 * self.slot + 1] = 0
            self._cells[2 * self.slot] = 0


_joined: ConnectionLedger | None = None


def join(
    shared_dir: str | None,
    on_move: Callable[[], None] | None = None,
    on_handoff: Callable[[], None] | None = None,
) -> ConnectionLedger | None:
    """At a worker's start-up (before it accepts): take this process's slot in the ledger
    of the workers sharing `shared_dir`, so that the others count it from then on, idle or
    not; `on_move` is called for each connection sent away, `on_handoff` for each passed
    to another worker. None (and nothing joined) without a shared directory."""
    global _joined
    if shared_dir and _joined is None:
        path = Path(shared_dir) / LEDGER_FILE
        _joined = ConnectionLedger(path, on_move=on_move, on_handoff=on_handoff)
        atexit.register(_joined.release)  # a worker stopped without its shutdown
    return _joined


def joined() -> ConnectionLedger | None:
    """The ledger this process joined, if any (asked per accepted connection)."""
    return _joined


def leave() -> None:
    """At shutdown: this worker's slot cleared."""
    global _joined
    if _joined is not None:
        _joined.release()
        _joined = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
