"""Rollouts on real uvicorn processes: `ifa-rank serve --workers 2` (a rollout, a share
change, a promote and a drop on one worker are followed by the other through the
worker group's control channel), and one `Service` under concurrent /rank traffic while
the admin calls run (no answer but 200)."""

from __future__ import annotations

import json
import threading
from functools import partial
from pathlib import Path

from e2e.serve_proc import ServeWorkers, request, versions
from e2e.uvicorn_proc import start_service
from svc_helpers import user, wait_until

from service.engine.registry import share_of
from service.store.embedded_redis import RedisServer

# two users on either side of a 50 % share (share_of is a stable hash)
CANDIDATE_USER = next(f"r-{i}" for i in range(1000) if share_of(f"r-{i}") < 0.5)
STABLE_USER = next(f"r-{i}" for i in range(1000) if share_of(f"r-{i}") >= 0.5)


def answered_past(codes: list[tuple[int, str]], n: int) -> bool:
    return len(codes) >= n


def test_two_workers_follow_a_rollout_its_promote_and_drop(
    tiny_artifacts_two_versions: Path, tmp_path: Path
) -> None:
    with ServeWorkers(tiny_artifacts_two_versions, tmp_path) as serve:
        port = serve.port
        wait_until(lambda: versions(port, CANDIDATE_USER) == {"v1"}, timeout_s=60)
        spec = {"candidate": "v2", "share": 0.5}
        status, payload = request(port, "POST", "/admin/rollout", spec)
        assert status == 200, payload
        # both workers route alike: the candidate's user on v2, the other on v1
        wait_until(lambda: versions(port, CANDIDATE_USER) == {"v2"}, timeout_s=60)
        assert versions(port, STABLE_USER, 64) == {"v1"}
        _, text = request(port, "GET", "/metrics")
        assert 'ifa_model_info{provider="cpu",role="candidate",version="v2"} 1.0' in text.decode()
        # a share of 0 on one worker: the other follows, nobody is on v2 any more
        status, payload = request(port, "POST", "/admin/rollout", {**spec, "share": 0.0})
        assert status == 200, payload
        wait_until(lambda: versions(port, CANDIDATE_USER) == {"v1"}, timeout_s=60)
        status, payload = request(port, "POST", "/admin/rollout", {**spec, "share": 1.0})
        assert status == 200, payload
        wait_until(lambda: versions(port, STABLE_USER) == {"v2"}, timeout_s=60)
        status, payload = request(port, "POST", "/admin/rollout/promote")
        assert status == 200 and json.loads(payload)["stable"] == "v2", payload
        # promoted everywhere: /v1/model on either worker says v2 is the stable one
        wait_until(
            lambda: all(
                [v["version"] for v in json.loads(request(port, "GET", "/v1/model")[1])["versions"]]
                == ["v2"]
                for _ in range(16)
            ),
            timeout_s=60,
        )
        _, text = request(port, "GET", "/metrics")
        assert 'ifa_model_info{provider="cpu",role="stable",version="v2"} 1.0' in text.decode()
        # a rollout of v1 back as the candidate, dropped: every worker serves v2 alone
        status, _ = request(port, "POST", "/admin/rollout", {"candidate": "v1", "share": 1.0})
        assert status == 200
        wait_until(lambda: versions(port, STABLE_USER) == {"v1"}, timeout_s=60)
        status, _ = request(port, "POST", "/admin/rollout/drop")
        assert status == 200
        wait_until(lambda: versions(port, STABLE_USER) == {"v2"}, timeout_s=60)
    output = serve.output()
    assert serve.clean_exit(), output[-3000:]
    assert "following a sibling" not in output, output[-3000:]


def test_rollout_promote_and_drop_under_load_answer_every_request(
    redis_server: RedisServer, tiny_artifacts_two_versions: Path, tmp_path: Path
) -> None:
    svc = start_service(redis_server, tiny_artifacts_two_versions, tmp_path / "svc.log")
    port = svc.port
    users = [user("e2e-ro") for _ in range(16)]
    codes: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer(k: int) -> None:
        i = k
        while not stop.is_set():
            body: dict[str, object] = {"user_id": users[i % len(users)], "candidates": [1, 2]}
            i += 1
            status, payload = request(port, "POST", "/rank", body)
            version = json.loads(payload).get("model_version", "") if status == 200 else ""
            codes.append((status, version))

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(codes) >= 20, timeout_s=60)
        for path, body in (
            ("/admin/rollout", {"candidate": "v2", "share": 0.5}),
            ("/admin/rollout/drop", None),
            ("/admin/rollout", {"candidate": "v2", "share": 0.5}),
            ("/admin/rollout/promote", None),
        ):
            status, payload = request(port, "POST", path, body)
            assert status == 200, (path, payload)
            wait_until(partial(answered_past, codes, len(codes) + 20), timeout_s=60)
    finally:
        stop.set()
        for t in threads:
            t.join()
        assert svc.stop()
    assert {c for c, _ in codes} == {200}, sorted({c for c, _ in codes})
    assert {v for _, v in codes} == {"v1", "v2"}
    assert {v for _, v in codes[-10:]} == {"v2"}
