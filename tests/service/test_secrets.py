"""No secret leaves the process: the Redis password and the admin token appear in no log
line, no answer (/v1/model, /metrics, /readyz, /openapi.json, errors) and no repr of the
settings. A real Redis with `requirepass`, the real app."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from svc_helpers import make_settings, random_events, user

from service.app import _redacted, create_app
from service.store.embedded_redis import RedisServer

PASSWORD = "pw-7f3a9c1e5d"
TOKEN = "tok-b81d44a0c2"


def test_no_secret_in_logs_answers_or_settings(
    private_redis: RedisServer, tiny_artifacts: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = private_redis.url
    assert plain.startswith("redis://")
    url = plain.replace("redis://", f"redis://:{PASSWORD}@", 1)
    with redis.Redis.from_url(plain) as r:
        r.config_set("requirepass", PASSWORD)
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    try:
        settings = make_settings(url, tiny_artifacts, admin_token=TOKEN)
        seen += [repr(settings), str(settings)]
        with TestClient(create_app(settings)) as client:
            u = user()
            assert (
                client.post("/events", json={"user_id": u, "events": random_events(5)}).status_code
                == 200
            )
            assert (
                client.post("/rank", json={"user_id": u, "candidates": [1, 2]}).status_code == 200
            )
            ready = client.get("/readyz")
            assert ready.status_code == 200 and "***@" in ready.json()["redis_mode"]
            seen += [client.get(p).text for p in ("/v1/model", "/metrics", "/openapi.json")]
            seen.append(ready.text)
            auth = {"authorization": f"Bearer {TOKEN}"}
            seen.append(client.post("/admin/reload", json={"version": "nope"}, headers=auth).text)
            seen.append(client.post("/admin/reload", headers={"authorization": "Bearer x"}).text)
    finally:
        with redis.Redis.from_url(url) as r:
            r.config_set("requirepass", "")
    seen.append(caplog.text)
    assert caplog.text  # the app did log (start-up, model, shutdown): the check has teeth
    for text in seen:
        assert PASSWORD not in text and TOKEN not in text


def test_redaction_covers_both_url_forms() -> None:
    assert _redacted("redis://user:s3cret@host:6379/0") == "redis://***@host:6379/0"
    assert _redacted("unix:///run/redis.sock?db=0&password=s3cret") == (
        "unix:///run/redis.sock?db=0&password=***"
    )
    assert _redacted("redis://host:6379/0") == "redis://host:6379/0"
