"""The loop closed, end to end on a small run: a real service process serves /rank, its
answers are logged; clicks come back through /events naming the answer; `ifa-rank logs
export` turns the log into a training file; `ifa-rank train` and `ifa-rank export` make a
new model from it; `/admin/reload` serves that model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from e2e.http_traffic import Http
from e2e.uvicorn_proc import TOKEN, Service, service_env
from svc_helpers import random_events, wait_until

from ifa_rank.cli import main

pytestmark = pytest.mark.slow

T0 = 1_700_000_000


def test_serve_click_export_train_export_reload(
    redis_url: str, tiny_artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)
    svc = Service(service_env(redis_url, artifacts), tmp_path / "svc.log").start()
    rng = np.random.default_rng(5)
    http = Http(svc.port)
    try:
        users = [f"life-{i}" for i in range(16)]
        for k, u in enumerate(users):
            status, _ = http.post("/events", {"user_id": u, "events": random_events(30, seed=k)})
            assert status == 200
        served = 0
        for round_ in range(4):  # four requests a user: enough for train / valid / test
            for u in users:
                cands = rng.choice(200, size=12, replace=False).tolist()
                status, answer = http.post("/rank", {"user_id": u, "candidates": cands})
                assert status == 200
                served += 1
                clicked = answer["items"][int(rng.integers(0, 3))]["item_id"]
                click = {
                    "item_id": clicked,
                    "ts": T0 + 10**6 + 100 * round_,
                    "action": 1,
                    "request_id": answer["request_id"],
                }
                status, _ = http.post("/events", {"user_id": u, "events": [click]})
                assert status == 200
        # written off the request path: every impression and click, a moment later
        wait_until(
            lambda: svc.metric("ifa_impressions_logged_total") >= 2 * served,
            what="the impression log written",
        )

        out = tmp_path / "served.parquet"
        export = ["logs", "export", "--out", str(out), "--redis-url", redis_url]
        assert main([*export, "--window-s", "0"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["impressions"] == served and summary["clicked_by_request_id"] == served
        df = pd.read_parquet(out)
        requests = df[df.request_id != ""]
        assert len(requests) == 12 * served
        assert requests.groupby("request_id").label.sum().eq(1).all()  # the one click each

        run = tmp_path / "run"
        train = ["train", "--data", str(out), "--model", "ifa", "--preset", "tiny"]
        assert main([*train, "--out", str(run), "--seed", "1"]) == 0
        new = ["export", str(run / "checkpoint.pt"), "--out", str(artifacts), "--version", "v2"]
        assert main(new) == 0

        status, body = http.post("/admin/reload", {"version": "v2"}, token=TOKEN)
        assert status == 200, body
        status, answer = http.post("/rank", {"user_id": users[0], "candidates": [1, 2]})
        assert status == 200 and answer["model_version"] == "v2" and answer["degraded"] is None
    finally:
        http.close()
        assert svc.stop()
