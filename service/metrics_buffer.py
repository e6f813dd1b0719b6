"""The warm path's metrics, counted in plain Python numbers and added to prometheus_client's
values in batches (`IFA_METRICS_FLUSH_MS`).

An answered /rank records about a dozen values: its stages, its candidates, its state's
source, its HTTP code, its latency, the in-flight gauge twice. Through prometheus_client
each is a lock, a pid check and a linear scan of the buckets, and under several workers
(its multiprocess mode) a write into an mmap'd file per value: 14-16 µs a request in one
process and 33-36 µs in a worker, against 3-4 µs buffered (`python -m
loadtest.metrics_cost`); 1-3 % of a warm request's CPU. Here an observation is a bisect
and an increment in Python; `flush` adds what was observed since the last flush to
prometheus_client's values: the same buckets, count and sum as observing each value
would give (tested).

One writer: observations come from one thread, the event loop's. `flush` may run in
another (a registry read in a test, say): it reads the running totals and adds their
difference from what it last wrote, so a value observed during a flush is written by the
next one, never lost. Flushes are serialised by the owner (`Metrics.flush`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class Incrementer(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class UpDown(Protocol):
    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...


class BufferedHistogram:
    """A histogram child's `observe`, buffered. prometheus_client has no public way to add
    n observations to a bucket at once, so `flush` adds to the child's bucket and sum
    values (`_buckets`, `_sum`); tests/service/test_metrics_buffer.py compares the
    exposition with a child observed directly, so a change there fails a test."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum", "_written", "_written_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        # prometheus_client counts a value in the first bucket whose bound is >= it (the
        # last bound is +Inf): bisect_left's index over the same bounds
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._written = [0] * len(self._bounds)
        self._sum = 0.0
        self._written_sum = 0.0

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def flush(self) -> None:
        child = self._child
        for i, n in enumerate(self._counts):
            delta = n - self._written[i]
            if delta:
                child._buckets[i].inc(delta)
                self._written[i] = n
        total = self._sum
        if total != self._written_sum:
            child._sum.inc(total - self._written_sum)
            self._written_sum = total


class BufferedCounter:
    """A counter child's `inc`, buffered: `flush` adds what was counted since the last."""

    __slots__ = ("_child", "_value", "_written")

    def __init__(self, child: Counter) -> None:
        self._child = child
        self._value = 0.0
        self._written = 0.0

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def flush(self) -> None:
        value = self._value
        if value != self._written:
            self._write(value)
            self._written = value

    def _write(self, value: float) -> None:
        self._child.inc(value - self._written)


class BufferedGauge(BufferedCounter):
    """A gauge that goes up and down (requests in flight): `flush` sets the value it has."""

    __slots__ = ("_gauge",)

    def __init__(self, child: Gauge) -> None:
        self._gauge = child
        self._value = 0.0
        self._written = float("nan")  # never written: the first flush sets it, even to 0

    def dec(self, amount: float = 1) -> None:
        self._value -= amount

    def _write(self, value: float) -> None:
        self._gauge.set(value)


Buffered = BufferedHistogram | BufferedCounter | BufferedGauge
