"""The machine and process figures the benchmarks read from /proc: a process's CPU, the
hypervisor's share of the machine's."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

from loadtest.sysinfo import cpu_ticks, descendants, proc_cpu_s, steal_pct, tree_cpu_s


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


def test_a_process_tree_counts_the_cpu_of_its_children() -> None:
    """A service of several workers is measured as one: the parent alone would count
    only uvicorn's supervisor. A parent that burns nothing and a grandchild that burns
    0.4 s, so that no other process of this test run's counts."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    spawn = (
        "import subprocess, sys\n"
        f"g = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
        "print(g.pid, flush=True)\n"
        "sys.stdin.read()\n"
        "g.wait()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", spawn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdin is not None and parent.stdout is not None
    try:
        grandchild = int(parent.stdout.readline())
        assert {parent.pid, grandchild} <= set(descendants(os.getpid()))
        assert descendants(parent.pid) == [grandchild]
        deadline = time.monotonic() + 30
        while proc_cpu_s(grandchild) < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree_cpu_s(parent.pid) - proc_cpu_s(parent.pid) >= 0.35
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
    assert parent.pid not in descendants(os.getpid())


def test_redis_reports_the_cpu_its_work_took(redis_url: str) -> None:
    import redis

    from loadtest.sysinfo import redis_cpu_s

    before = redis_cpu_s(redis_url)
    assert before is not None and before >= 0.0
    client = redis.Redis.from_url(redis_url)
    try:
        value = b"x" * 4096
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:  # enough commands for Redis to spend CPU
            pipe = client.pipeline(transaction=False)
            for i in range(200):
                pipe.set(f"cpu-{i}", value)
                pipe.get(f"cpu-{i}")
            pipe.execute()
    finally:
        client.close()
    after = redis_cpu_s(redis_url)
    assert after is not None and after > before


def test_a_redis_that_cannot_be_asked_gives_no_cpu_figure() -> None:
    from loadtest.sysinfo import redis_cpu_s
    from service.store.embedded_redis import free_port

    assert redis_cpu_s(None) is None
    assert redis_cpu_s(f"redis://127.0.0.1:{free_port()}/0") is None  # nothing listens
