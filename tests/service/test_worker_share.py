"""The workers' connection ledger (service/http/worker_share.py): each worker's share of
the open connections, what it sends away and when it asks. Two workers are two ledgers
on one file, each claimed for a live process (this one and a child)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.http.worker_share import CHECK_S, PEAK_S, ConnectionLedger


@pytest.fixture
def other_pid() -> Iterator[int]:
    """A live process besides this one (the ledger probes its workers with signal 0)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def opened(ledger: ConnectionLedger, n: int) -> ConnectionLedger:
    for _ in range(n):
        ledger.opened()
    return ledger


def two_workers(
    path: Path, other_pid: int, mine: int, theirs: int, **kw: Any
) -> tuple[ConnectionLedger, ConnectionLedger]:
    """This process's ledger with `mine` connections open, the other's with `theirs`."""
    return opened(ConnectionLedger(path, **kw), mine), opened(
        ConnectionLedger(path, pid=other_pid), theirs
    )


def test_a_worker_over_its_share_sends_the_excess_away(tmp_path: Path, other_pid: int) -> None:
    moved: list[int] = []
    a, b = two_workers(tmp_path / "ledger", other_pid, 6, 2, on_move=lambda: moved.append(1))
    assert a.slot != b.slot
    # 8 connections over 2 workers: a share of 4 each
    assert (a.excess(0.0), b.excess(0.0)) == (2, 0)
    # a connection accepted over the share asks at its first request; two go, then none
    assert [a.should_close(True, 0.0) for _ in range(3)] == [True, True, False]
    assert a.leaving == 2 and len(moved) == 2  # each one sent away counted (a metric)
    assert b.should_close(True, 0.0) is False


def test_connections_sent_away_count_until_their_clients_could_be_back(
    tmp_path: Path, other_pid: int
) -> None:
    a, _ = two_workers(tmp_path / "ledger", other_pid, 6, 2)
    assert a.should_close(True, 0.0) and a.should_close(True, 0.0)
    a.closed(leaving=True)
    a.closed(leaving=True)  # both gone; their clients have not reconnected yet
    assert (a.open, a.leaving) == (4, 0)
    # 6 open now, but the share stays that of the 8 seen lately: nothing more goes
    assert a.excess(1.0) == 0
    assert a.should_close(True, 1.0) is False
    # had the clients gone for good, the share is the one of what is left once the
    # window has passed: 6 over 2
    assert a.excess(1.0 + PEAK_S + 0.1) == 1


def test_a_worker_alone_never_sends_a_connection_away(tmp_path: Path) -> None:
    a = opened(ConnectionLedger(tmp_path / "ledger"), 10)
    assert a.excess(0.0) == 0
    assert a.should_close(True, 0.0) is False


def test_requests_ask_at_most_once_per_interval_unless_more_than_one_is_over(
    tmp_path: Path, other_pid: int
) -> None:
    a, _ = two_workers(tmp_path / "ledger", other_pid, 5, 3)
    # one over (5 against a share of 4): the first request asks, the next ones wait
    assert a.should_close(False, 10.0) is True
    a.closed(leaving=True)
    a.opened()  # its client came back here
    assert a.should_close(False, 10.0 + CHECK_S / 2) is False
    assert a.should_close(False, 10.0 + CHECK_S) is True
    # more than one over (9 open, one leaving, against a share of 6): every request asks
    # until the excess is gone, then they wait again
    opened(a, 4)
    assert a.excess(20.0) == 2
    assert [a.should_close(False, 20.0) for _ in range(3)] == [True, True, False]
    assert a.should_close(False, 20.0 + CHECK_S / 2) is False


def test_a_dead_workers_slot_is_left_out_and_taken_again(tmp_path: Path, other_pid: int) -> None:
    path = tmp_path / "ledger"
    a = opened(ConnectionLedger(path), 3)
    gone = opened(ConnectionLedger(path, pid=dead_pid()), 10)  # killed without clearing
    # 13 over 2 would be a share of 7: the dead one is found gone and left out
    assert a.excess(0.0) == 0
    assert ConnectionLedger(path, pid=other_pid).slot == gone.slot  # its slot taken again
    # a worker starting takes a dead one's slot even before anyone found it gone
    again = opened(ConnectionLedger(path, pid=dead_pid()), 5)
    assert ConnectionLedger(path).slot == a.slot  # this process: its own slot back
    assert ConnectionLedger(path, pid=os.getppid()).slot == again.slot


def test_a_released_slot_no_longer_counts(tmp_path: Path, other_pid: int) -> None:
    path = tmp_path / "ledger"
    a, b = two_workers(path, other_pid, 4, 0)
    assert a.excess(0.0) == 2
    b.release()
    assert a.excess(PEAK_S + 1.0) == 0
    b.opened()  # a connection closing after the release writes nothing
    assert a.excess(2 * PEAK_S + 2.0) == 0
    assert os.path.getsize(path) == 1024


def test_a_connection_over_the_share_is_passed_to_the_worker_furthest_under_it(
    tmp_path: Path, other_pid: int
) -> None:
    a, b = two_workers(tmp_path / "ledger", other_pid, 4, 2)
    # 6 open and one arriving here: a share of 4, and this worker would hold 5
    assert a.handoff_target(0.0) == other_pid
    # the one under its share keeps what it accepts
    assert b.handoff_target(0.0) is None
    a.closed(leaving=False)
    assert a.handoff_target(0.0) is None
    # a worker alone keeps everything
    assert opened(ConnectionLedger(tmp_path / "alone"), 9).handoff_target(0.0) is None


def test_connections_passed_count_there_before_that_worker_counts_them(
    tmp_path: Path, other_pid: int
) -> None:
    a, b = two_workers(tmp_path / "ledger", other_pid, 8, 0)
    # a burst of new connections, all arriving here, while the other's loop has not yet
    # counted any it was passed: they alternate instead of all going there
    kept = 0
    for _ in range(8):
        target = a.handoff_target(0.0)
        if target is None:
            a.opened()
            kept += 1
        else:
            a.passed(target, 0.0)
    assert (a.open, kept) == (8, 0)  # 8 here already: all 8 new ones passed on
    assert a.handoff_target(0.0) is None  # 8 and 8 (as passed): within the share
    # once the other counts them itself, the passed ones are no longer added
    opened(b, 8)
    assert a.excess(0.1) == 0 and a._passed == {}
    # one passed that the other never counts (its client went at once) stops counting
    # there after PEAK_S
    b.closed(leaving=False)
    t = PEAK_S + 1.0  # the burst's total no longer sets the share
    assert a.handoff_target(t) == other_pid  # 8 here, 7 there, one arriving: 8 each
    a.passed(other_pid, t)
    assert a.handoff_target(t) is None  # 8 there as passed: 17, a share of 9
    assert a._passed
    assert a.excess(t + PEAK_S + 0.1) == 0 and a._passed == {}
