from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from svc_helpers import make_settings, random_events, user

from service.app import create_app


def test_rank_and_events_roundtrip(redis_url: str, tiny_artifacts: Path) -> None:
    with TestClient(create_app(make_settings(redis_url, tiny_artifacts))) as client:
        assert client.get("/readyz").status_code == 200, client.get("/readyz").json()
        u = user()
        r = client.post("/events", json={"user_id": u, "events": random_events(5)})
        assert r.status_code == 200, r.text
        assert r.json() == {"user_id": u, "appended": 5, "length": 5}
        r = client.post("/rank", json={"user_id": u, "candidates": [1, 2, 3, 2], "request_id": "x"})
        assert r.status_code == 200, r.text
        print(r.json())
