"""`ifa-rank serve --workers 2` as a real process tree: one embedded Redis started by the
parent for both workers, /metrics merged over the workers, a reload on one worker
followed by the other, a clean stop; connections opened at once end up evenly spread."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

from e2e.serve_proc import ServeWorkers, request, versions
from svc_helpers import wait_until


def test_two_workers_share_redis_metrics_and_reloads(
    tiny_artifacts_two_versions: Path, tmp_path: Path
) -> None:
    with ServeWorkers(tiny_artifacts_two_versions, tmp_path) as serve:
        port, metrics_dir = serve.port, serve.metrics_dir
        wait_until(lambda: versions(port, "w-u", 16) == {"v1"}, timeout_s=60)
        sent = 200
        assert versions(port, "w-u", sent) == {"v1"}
        # both workers answered, and /metrics from either one counts every answer
        pids = {f.name.rsplit("_", 1)[-1] for f in metrics_dir.glob("counter_*.db")}
        assert len(pids) == 2, sorted(metrics_dir.iterdir())
        # (each worker writes its warm-path counts to the shared files every
        # IFA_METRICS_FLUSH_MS, 100 ms: the other worker's show up that late at most)

        def answered() -> float:
            _, text = request(port, "GET", "/metrics")
            line = next(
                ln
                for ln in text.decode().splitlines()
                if ln.startswith('ifa_http_responses_total{code="200",route="/rank"}')
            )
            return float(line.split()[-1])

        wait_until(lambda: answered() >= sent)
        # a reload on one worker is announced to the other, which follows
        status, payload = request(port, "POST", "/admin/reload", {"version": "v2"})
        assert status == 200, payload
        wait_until(lambda: versions(port, "w-u", 32) == {"v2"}, timeout_s=60)
        _, text = request(port, "GET", "/metrics")
        assert 'ifa_model_info{provider="cpu",role="stable",version="v2"} 1.0' in text.decode()
        assert (tmp_path / "redis").is_dir()  # the parent's embedded Redis
    output = serve.output()
    assert serve.clean_exit(), output[-3000:]
    assert "embedded redis-server for the workers" in output
    assert output.count("Application shutdown complete") == 2, output[-3000:]


def test_connections_opened_at_once_spread_evenly_over_the_workers(
    tiny_artifacts: Path, tmp_path: Path
) -> None:
    with ServeWorkers(tiny_artifacts, tmp_path) as serve:
        wait_until(lambda: len(serve.worker_pids()) == 2, timeout_s=60)
        # as a client pool does: every connection opened first, then requests on each;
        # http.client reconnects after an answer with `Connection: close`
        conns = [http.client.HTTPConnection("127.0.0.1", serve.port, timeout=30) for _ in range(16)]
        for c in conns:
            c.connect()

        def one_round() -> int:
            closes = 0
            for c in conns:
                c.request("GET", "/healthz")
                r = c.getresponse()
                assert (r.status, r.read()) == (200, b'{"status":"ok"}')
                closes += r.getheader("connection") == "close"
            time.sleep(0.2)  # the closed ones gone from the kernel's table
            return closes

        def rounds_until_even(per_worker: int) -> tuple[int, list[list[int]]]:
            closes, spreads = 0, []
            for _ in range(40):
                closes += one_round()
                spreads.append(sorted(serve.connections_per_worker().values()))
                if spreads[-1] == [per_worker] * 2:
                    break
            return closes, spreads

        def counters() -> tuple[float, float]:
            _, text = request(serve.port, "GET", "/metrics")
            lines = text.decode().splitlines()
            return tuple(  # type: ignore[return-value]
                next(float(ln.split()[-1]) for ln in lines if ln.startswith(f"{name} "))
                for name in ("ifa_connections_moved_total", "ifa_connections_handed_off_total")
            )

        wait_until(lambda: sum(serve.connections_per_worker().values()) == 16, timeout_s=10)
        first = sorted(serve.connections_per_worker().values())
        # a worker accepting over its share passes the connection on to the other before
        # reading from it (service/http/handoff.py); one still starting when they were
        # opened takes its share once it has joined: the other looks at its share at
        # least once a second and sends the excess away with `Connection: close`
        closes, spreads = rounds_until_even(8)
        assert spreads[-1] == [8, 8], (first, spreads)
        assert first == [8, 8] or closes > 0, (first, spreads, closes)
        # once even, it stays so: no connection is sent away again
        assert one_round() == 0
        assert sorted(serve.connections_per_worker().values()) == [8, 8]
        # every one sent away is counted, over both workers (the /metrics call's own
        # connection may be one more); none is passed on twice
        moved, passed = counters()
        assert closes <= moved <= closes + 1, (closes, moved)
        assert passed <= 16 + closes + 1, (closes, passed)

        # The clients close every connection one worker holds: the other, holding all
        # that are left, sends half of them away once its lately-seen total has passed
        # (2 s). The kernel hands the reconnects to whichever worker it favours, mostly
        # the one just left idle-less, which passes each to the other: they never bounce.
        ports = next(iter(serve.client_ports_per_worker().values()))
        left = [c for c in conns if c.sock is not None and c.sock.getsockname()[1] not in ports]
        for c in conns:
            if c not in left:
                c.close()
        conns[:] = left
        closes, spreads = rounds_until_even(4)
        assert spreads[-1] == [4, 4], spreads
        assert 4 <= closes <= 5, (closes, spreads)  # the excess, and the peak's margin
        assert one_round() == 0
        moved_after, passed_after = counters()
        assert closes <= moved_after - moved <= closes + 1, (moved, moved_after, closes)
        assert passed_after - passed <= closes + 1, (passed, passed_after, closes)
        for c in conns:
            c.close()
