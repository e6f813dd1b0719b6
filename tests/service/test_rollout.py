"""Safe rollouts (docs/deploy.md "Rolling out a model"): a candidate version for a stable
share of users, a shadow version scored and logged but never returned, promote and drop
under traffic with no failed request. Real Redis, real ONNX Runtime, the app's lifespan."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_version
from fastapi.testclient import TestClient
from svc_helpers import (
    make_settings,
    metric_value,
    random_events,
    registry_value,
    sync_redis,
    user,
    wait_until,
)

from ifa_common.state import UserState
from model_export.data.served import export_served
from service.app import create_app
from service.engine.registry import ModelRegistry, share_of
from service.engine.state_cache import CacheBudget, StateCache, state_bytes
from service.store.impressions import stream_key
from service.store.redis_store import state_key

TOKEN = "rollout-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SHARDS = 2


@pytest.fixture(scope="module")
def three_versions(
    tiny_artifacts_two_versions: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """v1, v2 and v3 (same weights, three version names)."""
    root = tmp_path_factory.mktemp("rollout") / "artifacts"
    shutil.copytree(tiny_artifacts_two_versions, root, symlinks=True)
    copy_version(root, "v1", "v3")
    return root


def has_key(client: Any, key: str) -> bool:
    return bool(client.exists(key))


def registry_of(client: TestClient) -> ModelRegistry:
    registry: ModelRegistry = client.app.state.rank.registry  # type: ignore[attr-defined]
    return registry


def test_share_of_is_stable_and_close_to_the_share() -> None:
    users = [f"user-{i}" for i in range(20_000)]
    shares = [share_of(u) for u in users]
    assert shares == [share_of(u) for u in users]  # the same user, the same point
    assert all(0.0 <= s < 1.0 for s in shares)
    for target in (0.01, 0.1, 0.5):
        got = float(np.mean(np.asarray(shares) < target))
        assert abs(got - target) < 0.01 + 0.1 * target, (target, got)


def test_admin_rollout_needs_the_token_and_a_rollout_to_promote(
    redis_url: str, three_versions: Path
) -> None:
    settings = make_settings(redis_url, three_versions, admin_token=TOKEN, impression_log=False)
    with TestClient(create_app(settings)) as client:
        assert client.post("/admin/rollout", json={"candidate": "v2"}).status_code == 401
        assert client.post("/admin/rollout/promote").status_code == 401
        assert client.post("/admin/rollout/promote", headers=AUTH).status_code == 409
        r = client.post("/admin/rollout", json={"candidate": "nope", "share": 0.1}, headers=AUTH)
        assert r.status_code == 404, r.text
        r = client.post("/admin/rollout", json={"candidate": "v1", "share": 0.1}, headers=AUTH)
        assert r.status_code == 422 and "stable" in r.text, r.text
        r = client.post("/admin/rollout", json={"candidate": "v2", "share": 2}, headers=AUTH)
        assert r.status_code == 422 and "share" in r.text, r.text
        # a shadow's scores need somewhere to go
        r = client.post("/admin/rollout", json={"shadow": "v2", "shadow_rate": 1}, headers=AUTH)
        assert r.status_code == 422 and "IFA_IMPRESSION_LOG" in r.text, r.text
        assert client.get("/v1/model").json()["versions"] == [
            {
                "version": "v1",
                "role": "stable",
                "share": 1.0,
                "provider": "cpu",
                "loaded_at": registry_of(client).current().loaded_at,
            }
        ]


def test_a_user_gets_one_version_and_its_states_are_kept_under_it(
    redis_url: str, three_versions: Path
) -> None:
    settings = make_settings(redis_url, three_versions, admin_token=TOKEN)
    users = [user() for _ in range(30)]
    with TestClient(create_app(settings)) as client:
        for u in users:
            client.post("/events", json={"user_id": u, "events": random_events(5)})
        r = client.post("/admin/rollout", json={"candidate": "v2", "share": 0.5}, headers=AUTH)
        assert r.status_code == 200 and r.json() == {
            "stable": "v1",
            "candidate": "v2",
            "share": 0.5,
            "shadow": None,
            "shadow_rate": 0.0,
        }
        want = {u: ("v2" if share_of(u) < 0.5 else "v1") for u in users}
        assert set(want.values()) == {"v1", "v2"}
        for _ in range(2):
            for u in users:
                r = client.post("/rank", json={"user_id": u, "candidates": [1, 2, 3]})
                assert r.status_code == 200 and r.json()["model_version"] == want[u], u
        with sync_redis(redis_url) as c:
            for u in users:
                other = "v1" if want[u] == "v2" else "v2"
                wait_until(partial(has_key, c, state_key(u, want[u])))
                assert not c.exists(state_key(u, other)), u

        info = client.get("/v1/model").json()
        assert info["version"] == "v1"
        assert [(v["version"], v["role"], v["share"]) for v in info["versions"]] == [
            ("v1", "stable", 0.5),
            ("v2", "candidate", 0.5),
        ]
        text = client.get("/metrics").text
        assert 'ifa_model_info{provider="cpu",role="candidate",version="v2"} 1.0' in text
        assert 'ifa_model_info{provider="cpu",role="stable",version="v1"} 1.0' in text
        by_version = {
            v: metric_value(client, "ifa_rank_request_duration_seconds_count", version=v)
            for v in ("v1", "v2")
        }
        n2 = 2 * sum(v == "v2" for v in want.values())
        assert by_version == {"v1": 2 * len(users) - n2, "v2": n2}
        score = "ifa_rank_stage_duration_seconds_count"
        assert metric_value(client, score, stage="score", version="v2") == n2

        # ramping the share up moves users to the candidate and reloads nothing
        candidate = registry_of(client).rollout.candidate  # type: ignore[union-attr]
        r = client.post("/admin/rollout", json={"candidate": "v2", "share": 1.0}, headers=AUTH)
        assert r.status_code == 200
        assert registry_of(client).rollout.candidate is candidate  # type: ignore[union-attr]
        for u in users:
            r = client.post("/rank", json={"user_id": u, "candidates": [1, 2, 3]})
            assert r.json()["model_version"] == "v2"


def test_promote_and_drop_under_traffic_fail_no_request(
    redis_url: str, three_versions: Path
) -> None:
    settings = make_settings(redis_url, three_versions, admin_token=TOKEN)
    users = [user() for _ in range(12)]
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()
    with TestClient(create_app(settings)) as client:
        for u in users:
            client.post("/events", json={"user_id": u, "events": random_events(10)})

        def hammer(k: int) -> None:
            i = k
            while not stop.is_set():
                u = users[i % len(users)]
                i += 1
                r = client.post("/rank", json={"user_id": u, "candidates": [1, 2, 3, 4]})
                results.append((r.status_code, r.json().get("model_version")))

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(results) >= 10)
            r = client.post("/admin/rollout", json={"candidate": "v2", "share": 0.5}, headers=AUTH)
            assert r.status_code == 200, r.text
            wait_until(lambda: sum(v == "v2" for _, v in results) >= 5)
            r = client.post("/admin/rollout/drop", headers=AUTH)
            assert r.status_code == 200 and r.json()["candidate"] is None, r.text
            assert r.json()["dropped"]["candidate"] == "v2"
            seen = len(results)
            wait_until(lambda: len(results) >= seen + 10)
            r = client.post("/admin/rollout", json={"candidate": "v3", "share": 0.5}, headers=AUTH)
            assert r.status_code == 200, r.text
            wait_until(lambda: sum(v == "v3" for _, v in results) >= 5)
            candidate = registry_of(client).rollout.candidate  # type: ignore[union-attr]
            r = client.post("/admin/rollout/promote", headers=AUTH)
            assert r.status_code == 200, r.text
            assert r.json()["stable"] == "v3" and r.json()["previous"] == "v1"
            assert registry_of(client).slot is candidate  # promoted as it was: no reload
            seen = len(results)
            wait_until(lambda: len(results) >= seen + 20)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert all(code == 200 for code, _ in results), {c for c, _ in results}
        assert {v for _, v in results} == {"v1", "v2", "v3"}
        assert {v for _, v in results[-10:]} == {"v3"}  # after the promote: v3 for everyone
        info = client.get("/v1/model").json()
        assert [(v["version"], v["role"]) for v in info["versions"]] == [("v3", "stable")]
        text = client.get("/metrics").text
        assert 'ifa_model_info{provider="cpu",role="stable",version="v3"} 1.0' in text
        assert 'role="candidate"' not in text and 'role="stable",version="v1"' not in text


def test_shadow_scores_are_logged_and_never_returned(
    redis_url: str, three_versions: Path, tmp_path: Path
) -> None:
    settings = make_settings(
        redis_url,
        three_versions,
        admin_token=TOKEN,
        impression_log=True,
        impression_shards=SHARDS,
    )
    users = [user() for _ in range(6)]
    with TestClient(create_app(settings)) as client:
        for u in users:
            client.post("/events", json={"user_id": u, "events": random_events(8)})
        r = client.post("/admin/rollout", json={"shadow": "v3", "shadow_rate": 1.0}, headers=AUTH)
        assert r.status_code == 200 and r.json()["shadow"] == "v3", r.text
        rids = []
        for i, u in enumerate(users):
            r = client.post(
                "/rank",
                json={"user_id": u, "candidates": [5, 6, 7, 8], "top_k": 2, "request_id": f"q{i}"},
            )
            assert r.status_code == 200 and r.json()["model_version"] == "v1"
            assert "v3" not in r.text
            rids.append(f"q{i}")
        wait_until(lambda: metric_value(client, "ifa_shadow_requests_total", result="scored") == 6)
        roles = [
            (v["version"], v["role"], v["share"])
            for v in client.get("/v1/model").json()["versions"]
        ]
        assert roles == [("v1", "stable", 1.0), ("v3", "shadow", 1.0)]
        with sync_redis(redis_url) as c:
            wait_until(
                lambda: (
                    sum(
                        f[b"type"] == b"shadow"
                        for s in range(SHARDS)
                        for _, f in c.xrange(stream_key(s))
                    )
                    == 6
                )
            )
            entries = [f for s in range(SHARDS) for _, f in c.xrange(stream_key(s))]
            shadow = {f[b"rid"].decode(): f for f in entries if f[b"type"] == b"shadow"}
            served = {f[b"rid"].decode(): f for f in entries if f[b"type"] == b"imp"}
            assert sorted(shadow) == sorted(served) == sorted(rids)
            for rid, f in shadow.items():
                assert f[b"v"] == b"v3" and served[rid][b"v"] == b"v1"
                # every candidate scored, not only the top_k the client got
                assert sorted(np.frombuffer(f[b"items"], "<i8").tolist()) == [5, 6, 7, 8]
                assert len(np.frombuffer(served[rid][b"items"], "<i8")) == 2
            # the shadow kept its own states, under its own version
            for u in users:
                wait_until(partial(has_key, c, state_key(u, "v3")))
        # the export carries what was served, never the shadow's scores
        out = tmp_path / "served.parquet"
        with sync_redis(redis_url) as c:
            done = export_served(c, out, shards=SHARDS, window_s=0, now_s=time.time() + 1)
        assert done.impressions == 6
        r = client.post("/admin/rollout/drop", headers=AUTH)
        assert r.status_code == 200 and r.json()["shadow"] is None
        client.post("/rank", json={"user_id": users[0], "candidates": [1], "request_id": "after"})
        assert metric_value(client, "ifa_shadow_requests_total", result="scored") == 6


def _empty(n: int) -> UserState:
    return dataclasses.replace(UserState.empty(2, 4, 4), n=n)


def test_the_caches_of_the_versions_share_one_budget() -> None:
    one = state_bytes(_empty(1))
    budget = CacheBudget(capacity=1000, max_bytes=10 * one)
    stable = StateCache(1000, budget=budget)
    for i in range(10):
        stable.put(f"s{i}", _empty(1))
    candidate = StateCache(1000, budget=budget)  # a rollout starts: the stable one is full
    for i in range(8):
        candidate.put(f"c{i}", _empty(1))
    # one budget for both; the larger gave way, down to an equal split, not further
    assert budget.nbytes == 10 * one and budget.count == len(stable) + len(candidate) == 10
    assert (len(stable), len(candidate)) == (5, 5)
    assert "s9" in stable and "s0" not in stable  # least recently used first
    candidate.close()  # dropped: its share of the budget is free again
    assert budget.count == 5 and budget.nbytes == 5 * one
    candidate.put("late", _empty(1))  # a request still in flight on the dropped slot
    assert budget.count == 5 and len(candidate) == 0
    for i in range(10, 20):
        stable.put(f"s{i}", _empty(1))
    assert len(stable) == 10  # alone again: the whole budget


def test_one_cache_alone_keeps_its_count_bound() -> None:
    cache = StateCache(3)
    for i in range(5):
        cache.put(f"u{i}", _empty(1))
    assert len(cache) == 3 and cache.budget.count == 3 and "u4" in cache


def test_a_rollout_from_the_settings_and_latest_is_the_stable_version(
    redis_url: str, three_versions: Path
) -> None:
    settings = make_settings(
        redis_url,
        three_versions,
        admin_token=TOKEN,
        candidate_version="v2",
        candidate_share=1.0,
    )
    with TestClient(create_app(settings)) as client:
        r = client.post("/rank", json={"user_id": user(), "candidates": [1, 2]})
        assert r.status_code == 200 and r.json()["model_version"] == "v2"
        roles = [(v["version"], v["role"]) for v in client.get("/v1/model").json()["versions"]]
        assert roles == [("v1", "stable"), ("v2", "candidate")]
        # `latest` names v1 here (the stable version): refused once it is loaded
        r = client.post("/admin/rollout", json={"candidate": "latest", "share": 0.5}, headers=AUTH)
        assert r.status_code == 422, r.text
        assert registry_of(client).budget.caches == [
            registry_of(client).current().cache,
            registry_of(client).rollout.candidate.cache,  # type: ignore[union-attr]
        ]


def test_shadow_scoring_is_bounded_and_counts_what_it_skips(three_versions: Path) -> None:
    from service.engine.cost import CostModel
    from service.engine.registry import Rollout
    from service.engine.slot import ModelSlot
    from service.metrics import Metrics
    from service.usecases.shadow import ShadowScorer

    class Blocked:
        """A state resolver that waits until released (a slow shadow)."""

        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def resolve(self, ctx: Any) -> UserState:
            await self.release.wait()
            return ctx.slot.runtime.empty_state()  # type: ignore[no-any-return]

    class Inline:
        async def score(
            self, rt: Any, state: UserState, items: Any, cost: float, alone: bool
        ) -> Any:
            return rt.score(state, items)

    class Registry:
        rollout: Rollout | None = None

    async def main() -> Metrics:
        from service.engine.runtime import ModelRuntime

        rt = ModelRuntime.load(three_versions, "v3")
        shadow = ModelSlot(runtime=rt, cache=StateCache(10), cost=CostModel())
        registry = Registry()
        registry.rollout = Rollout(None, 0.0, shadow, 1.0)
        metrics, states = Metrics(), Blocked()
        scorer = ShadowScorer(
            registry,  # type: ignore[arg-type]
            states,  # type: ignore[arg-type]
            Inline(),  # type: ignore[arg-type]
            metrics,
            None,
            budget_ms=1000,
            max_inflight=2,
        )
        for i in range(5):
            scorer.offer(f"r{i}", "u", [1, 2, 3])
        assert scorer.inflight == 2
        states.release.set()
        await asyncio.gather(*(asyncio.all_tasks() - {asyncio.current_task()}))
        assert scorer.inflight == 0
        registry.rollout = Rollout(None, 0.0, shadow, 0.0)  # rate 0: nothing sampled
        scorer.offer("r9", "u", [1])
        assert scorer.inflight == 0
        await scorer.close()
        return metrics

    metrics = asyncio.run(main())
    assert registry_value(metrics.registry, "ifa_shadow_requests_total", result="scored") == 2
    assert registry_value(metrics.registry, "ifa_shadow_requests_total", result="skipped") == 3


def test_a_reload_to_the_candidates_version_ends_that_part_of_the_rollout(
    redis_url: str, three_versions: Path
) -> None:
    settings = make_settings(redis_url, three_versions, admin_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        r = client.post("/admin/rollout", json={"candidate": "v2", "share": 0.5}, headers=AUTH)
        assert r.status_code == 200
        r = client.post("/admin/reload", json={"version": "v2"}, headers=AUTH)
        assert r.status_code == 200
        assert registry_of(client).rollout is None
        roles = [(v["version"], v["role"]) for v in client.get("/v1/model").json()["versions"]]
        assert roles == [("v2", "stable")]
        assert len(registry_of(client).budget.caches) == 1
        assert 'role="candidate"' not in client.get("/metrics").text
