"""DELETE /users/{user_id}: the real app (TestClient), a real Redis (and a real cluster),
the exported model. After a forget the user is a cold user with no history."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from svc_helpers import (
    make_settings,
    metric_value,
    push_and_strict,
    random_events,
    seed_sequence,
    sync_redis,
    user,
    wait_until,
)

from service.app import create_app
from service.store.embedded_redis import RedisServer
from service.store.impressions import shard_of, stream_key
from service.store.redis_store import idem_key, seq_key, state_key

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
CANDS = list(range(40))


@pytest.fixture
def redis_url(redis_any: str) -> str:
    """The tests here that take `redis_url` run against one Redis and against a cluster."""
    return redis_any


@pytest.fixture
def one_redis(redis_server: RedisServer) -> str:
    """One Redis only: what these tests check does not depend on the topology."""
    from conftest import _flushed

    url: str = _flushed(redis_server)
    return url


def scores(client: TestClient, u: str) -> list[float]:
    r = client.post("/rank", json={"user_id": u, "candidates": CANDS})
    assert r.status_code == 200, r.text
    assert r.json()["degraded"] is None
    return [it["score"] for it in sorted(r.json()["items"], key=lambda it: it["item_id"])]


def forget(client: TestClient, u: str) -> dict[str, Any]:
    r = client.delete(f"/users/{u}", headers=AUTH)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_forgotten_user_is_cold_everywhere(redis_url: str, tiny_artifacts: Path) -> None:
    settings = make_settings(redis_url, tiny_artifacts, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        u, newcomer = user("forget"), user("new")
        for key, seed in (("k1", 1), ("k2", 2)):
            body = {"user_id": u, "events": random_events(20, seed=seed), "idempotency_key": key}
            assert client.post("/events", json=body).status_code == 200
        history = scores(client, u)
        assert history != scores(client, newcomer)
        # the impression log holds one answer of each (written off the request path)
        wait_until(lambda: metric_value(client, "ifa_impressions_logged_total") >= 2)
        with sync_redis(redis_url) as r:
            wait_until(lambda: r.exists(state_key(u, "v1")), what="the state written back")
        got = forget(client, u)
        assert got == {
            "user_id": u,
            "removed": {"sequence": 1, "states": 1, "idempotency_keys": 2, "impressions": 1},
            "cached_states_dropped": 1,
        }
        with sync_redis(redis_url) as r:
            assert not r.exists(seq_key(u), state_key(u, "v1"), idem_key(u, "k1"))
        # idempotent: a second forget finds nothing
        nothing = {"sequence": 0, "states": 0, "idempotency_keys": 0, "impressions": 0}
        assert forget(client, u)["removed"] == nothing
        with sync_redis(redis_url) as r:  # the newcomer's entry is still there
            log = r.xrange(stream_key(shard_of(newcomer, settings.impression_shards)))
            assert [f[b"uid"] for _, f in log] == [newcomer.encode()]
        np.testing.assert_allclose(scores(client, u), scores(client, newcomer), atol=1e-7)
        assert metric_value(client, "ifa_users_forgotten_total", source="request") == 2
        assert metric_value(client, "ifa_forgotten_cached_states_total", source="request") == 1
        assert metric_value(client, "ifa_users_forgotten_total", source="broadcast") == 0
        ok = metric_value(client, "ifa_http_responses_total", route="/users/{user_id}", code="200")
        assert ok == 2
        # the idempotency keys went too: a retry of a call from before is a new append
        body = {"user_id": u, "events": random_events(20, seed=1), "idempotency_key": "k1"}
        assert client.post("/events", json=body).json()["length"] == 20


def test_admin_token_and_user_id_are_checked(one_redis: str, tiny_artifacts: Path) -> None:
    with TestClient(create_app(make_settings(one_redis, tiny_artifacts))) as client:
        assert client.delete("/users/u1", headers=AUTH).status_code == 404  # no token set
    settings = make_settings(one_redis, tiny_artifacts, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        assert client.delete("/users/u1").status_code == 401
        r = client.delete("/users/u1", headers={"authorization": "Bearer wrong-token"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.delete("/users/bad%20id").status_code == 401  # the token comes first
        r = client.delete("/users/bad%20id", headers=AUTH)
        assert r.status_code == 422 and r.json()["error"].startswith("path.user_id: ")
        r = client.delete(f"/users/{'u' * 129}", headers=AUTH)
        assert r.status_code == 422 and "at most 128" in r.json()["error"]
        assert client.post("/users/u1", headers=AUTH).status_code == 405
        spec = client.get("/openapi.json").json()["paths"]["/users/{user_id}"]["delete"]
        assert spec["security"] == [{"adminToken": []}]
        assert {"200", "401", "404", "422", "503"} <= set(spec["responses"])


def test_redis_down_is_503_and_a_retry_completes(
    private_redis: RedisServer, tiny_artifacts: Path
) -> None:
    settings = make_settings(
        private_redis.url, tiny_artifacts, admin_token=TOKEN, redis_timeout_ms=200
    )
    with TestClient(create_app(settings)) as client:
        u = user()
        client.post("/events", json={"user_id": u, "events": random_events(5)})
        private_redis.stop()
        r = client.delete(f"/users/{u}", headers=AUTH)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        private_redis.start()
        r = wait_until(
            lambda: (
                (resp := client.delete(f"/users/{u}", headers=AUTH)).status_code == 200 and resp
            ),
            what="the forget after Redis came back",
        )
        assert r.json()["removed"]["sequence"] == 1


def gate_first_read(client: TestClient) -> tuple[threading.Event, threading.Event]:
    """The first sequence read of the resolver returns its records only once `release` is
    set (after `entered`): a build holding the user's history, parked in flight."""
    store = client.app.state.rank.states.store  # type: ignore[attr-defined]
    read: Callable[..., Any] = store.read_range
    entered, release = threading.Event(), threading.Event()

    async def gated(user: str, start: int, stop: int) -> Any:
        events = await read(user, start, stop)
        if not entered.is_set():
            entered.set()
            await asyncio.to_thread(release.wait, 30)
        return events

    store.read_range = gated
    return entered, release


@pytest.mark.parametrize("rank_meanwhile", [False, True], ids=["parked-only", "rank-meanwhile"])
def test_a_build_in_flight_does_not_bring_the_history_back(
    one_redis: str, tiny_artifacts: Path, rank_meanwhile: bool
) -> None:
    """A /rank's build has read the user's 300 events when the user is forgotten, and
    finishes only after they started again with 400 new ones: neither this replica's cache
    nor Redis may get its state (folding the new events onto it would bring the forgotten
    history back: Redis' own check passes, the sequence being long enough)."""
    settings = make_settings(one_redis, tiny_artifacts, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        app: Any = client.app
        u, twin = user("race"), user("twin")
        seed_sequence(one_redis, u, 300)
        entered, release = gate_first_read(client)
        answers: list[int] = []
        old = threading.Thread(
            target=lambda: answers.append(
                client.post("/rank", json={"user_id": u, "candidates": CANDS}).status_code
            )
        )
        old.start()
        try:
            assert entered.wait(30), "the build never read the sequence"
            assert forget(client, u)["removed"]["sequence"] == 1
            again = random_events(400, seed=9)
            for who in (u, twin):
                assert client.post("/events", json={"user_id": who, "events": again}).is_success
            if rank_meanwhile:
                # not a follower of the parked build: its own build, of the new history
                np.testing.assert_allclose(scores(client, u), scores(client, twin), atol=1e-6)
        finally:
            release.set()
            old.join(60)
        assert answers == [200]  # the request from before the forget is answered
        wait_until(lambda: app.state.rank.states.writeback.pending == 0, what="writes flushed")
        cached = app.state.rank.registry.slot.cache.get(u)
        assert cached is None or cached.n == 400  # never the parked build's 300
        with sync_redis(one_redis) as r:
            stored = r.get(state_key(u, "v1"))
        runtime = app.state.rank.registry.slot.runtime
        assert stored is None or runtime.deserialize_state(stored).n == 400
        np.testing.assert_allclose(scores(client, u), scores(client, twin), atol=1e-6)


@pytest.fixture
def apps(one_redis: str, tiny_artifacts: Path) -> Iterator[tuple[TestClient, TestClient]]:
    with push_and_strict(one_redis, tiny_artifacts, admin_token=TOKEN) as pair:
        yield pair


def test_a_strict_replica_hears_the_forget_too(
    apps: tuple[TestClient, TestClient], one_redis: str
) -> None:
    """Strict mode needs no push channel for its reads, but listens for the forgets."""
    push, strict = apps
    u = user()
    seed_sequence(one_redis, u, 50)
    scores(strict, u)  # cached there
    wait_until(lambda: strict.app.state.push.sessions >= 1, what="strict replica listening")  # type: ignore[attr-defined]
    forget(push, u)
    wait_until(
        lambda: metric_value(strict, "ifa_forgotten_cached_states_total", source="broadcast") == 1,
        what="the strict replica dropped its state",
    )
    assert metric_value(strict, "ifa_users_forgotten_total", source="broadcast") == 1
    assert metric_value(push, "ifa_users_forgotten_total", source="broadcast") == 0  # its own


def test_forgotten_is_bounded_and_errs_on_the_safe_side() -> None:
    from service.engine.forgotten import Forgotten

    f = Forgotten(capacity=2)
    before = f.mark()
    assert not f.since("a", before)
    f.forget("a")
    after_a = f.mark()
    assert f.since("a", before) and not f.since("a", after_a) and not f.since("b", before)
    f.forget("b")
    f.forget("c")  # "a" is no longer remembered
    assert len(f) == 2
    # work from before "a" was forgotten cannot rule "a" (or anyone) out any more ...
    assert f.since("a", before) and f.since("z", before)
    # ... work that began after every forgotten-and-dropped one can
    assert not f.since("a", after_a) and not f.since("z", after_a)
    assert f.since("b", after_a) and not f.since("b", f.mark())
