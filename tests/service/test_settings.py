"""Settings: env prefix IFA_, defaults per docs/CONTRACTS.md, bad values refused at start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("IFA_"):
            monkeypatch.delenv(key)
    s = Settings()
    assert s.redis_url is None and s.embedded_redis
    assert s.embedded_redis_dir == Path("var/redis") and s.artifacts_dir == Path("artifacts")
    assert (s.model_version, s.default_budget_ms, s.max_candidates) == ("latest", 40, 2000)
    assert (s.max_events_per_call, s.max_body_bytes, s.state_cache_size) == (1000, 1048576, 100000)
    assert (s.infer_threads, s.infer_workers, s.max_inflight) == (1, 2, 64)
    assert (s.redis_timeout_ms, s.idempotency_ttl_s, s.admin_token) == (50, 86400, None)
    assert s.prefer_cuda is True and s.log_level == "info"


def test_environment_is_read_when_constructed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IFA_REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("IFA_MAX_CANDIDATES", "500")
    monkeypatch.setenv("IFA_WARMUP_CANDIDATES", "1,50,5000")
    monkeypatch.setenv("IFA_ADMIN_TOKEN", "0123456789")
    monkeypatch.setenv("IFA_LOG_LEVEL", "DEBUG")
    s = Settings()
    assert s.redis_url == "redis://cache:6379/0" and s.max_candidates == 500
    assert s.warmup_counts() == (1, 50, 500)  # capped at the candidate limit
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "0123456789"
    assert "0123456789" not in repr(s)
    assert s.log_level == "debug"
    monkeypatch.setenv("IFA_REDIS_URL", "")
    assert Settings().redis_url is None  # empty = embedded


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("redis_url", "http://x"),
        ("default_budget_ms", 0),
        ("max_candidates", 0),
        ("max_events_per_call", -1),
        ("max_body_bytes", 10),
        ("state_cache_size", 0),
        ("infer_threads", 0),
        ("infer_workers", 0),
        ("redis_timeout_ms", 0),
        ("admin_token", "short"),
        ("log_level", "loud"),
        ("warmup_candidates", "1,0"),
        ("max_inflight", 1),  # < infer_workers (2)
    ],
)
def test_bad_values_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**{field: value})
    assert field in str(err.value) or "IFA_MAX_INFLIGHT" in str(err.value)
