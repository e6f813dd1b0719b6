"""The machine and process figures the benchmarks read from /proc: a process's CPU, the
hypervisor's share of the machine's."""

from __future__ import annotations

import math
import os
import time

from loadtest.sysinfo import cpu_ticks, proc_cpu_s, steal_pct


def test_steal_is_the_share_of_the_ticks_between_two_readings() -> None:
    assert steal_pct((10, 1_000), (60, 2_000)) == 5.0
    assert steal_pct((0, 0), (0, 400)) == 0.0
    assert math.isnan(steal_pct(None, (60, 2_000)))
    assert math.isnan(steal_pct((10, 1_000), None))
    assert math.isnan(steal_pct((10, 1_000), (10, 1_000)))  # no time passed


def test_the_machine_ticks_move_forward_and_steal_is_a_part_of_them() -> None:
    before = cpu_ticks()
    assert before is not None  # Linux: /proc/stat
    deadline = time.perf_counter() + 0.1
    while time.perf_counter() < deadline:  # at least one clock tick of work
        pass
    after = cpu_ticks()
    assert after is not None
    assert after[1] > before[1] and after[0] >= before[0]
    assert 0.0 <= after[0] <= after[1]
    assert 0.0 <= steal_pct(before, after) <= 100.0


def test_a_process_cpu_agrees_with_its_own_clock() -> None:
    before, clock = proc_cpu_s(os.getpid()), time.process_time()
    while time.process_time() - clock < 0.3:  # CPU time, not wall time
        sum(i * i for i in range(10_000))
    spent = proc_cpu_s(os.getpid()) - before
    assert 0.2 <= spent <= 0.6, spent
