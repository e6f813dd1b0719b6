"""App factory and lifespan: `create_app(settings)`; `uvicorn --factory service.app:app_from_env`.

The lifespan opens (or starts) Redis, loads, verifies and warms the model, starts the
inference executor and the state write-back, and on shutdown closes all of it in the
reverse order (uvicorn has already drained the HTTP requests in flight by then).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.middleware import Middleware

from service.engine.batcher import ScoreBatcher
from service.engine.cost import Warmup
from service.engine.forgotten import Forgotten
from service.engine.freshness import Freshness
from service.engine.pool import InferencePool
from service.engine.registry import ModelRegistry
from service.engine.slot import Runtime
from service.engine.state_cache import StateWriteBack
from service.engine.state_resolver import StateResolver
from service.engine.turnstile import Turnstile
from service.http import arrival, worker_share
from service.http.fast_path import RankApp
from service.http.inline_rank import InlineRank
from service.http.middleware import (
    BodyLimitMiddleware,
    BodyRules,
    DrainMiddleware,
    RequestMetricsMiddleware,
    install_error_handlers,
)
from service.http.routes import router
from service.metrics import MULTIPROC_ENV, Metrics
from service.settings import Settings
from service.store.cluster import NodeAddress, cluster_primaries, single_node
from service.store.embedded_redis import RedisServer, supervise
from service.store.forget import ImpressionForgetter, RedisForgetter
from service.store.impressions import ImpressionLog
from service.store.push import InvalidationListener
from service.store.redis_store import (
    Client,
    RedisSequenceStore,
    make_client,
    seq_key,
    user_of_seq_key,
)
from service.usecases.admin import AdminUseCase, control_channel
from service.usecases.events import EventsUseCase
from service.usecases.forget import FORGET_CHANNEL, Forgetter, ForgetUseCase
from service.usecases.rank import RankUseCase
from service.usecases.shadow import ShadowScorer

log = logging.getLogger("service")

DRAIN_TIMEOUT_S = 5.0
# how long start-up waits for the push channel's first session (its subscriptions)
PUSH_START_WAIT_S = 3.0


def load_runtime(settings: Settings, version: str | None) -> tuple[Runtime, Warmup]:
    """Blocking: load + verify (sha256) + warm one artifact version. Runs in a thread."""
    from service.engine.runtime import ModelRuntime  # onnxruntime is imported with the first model

    rt = ModelRuntime.load(
        settings.artifacts_dir,
        version=None if version in (None, "latest") else version,
        intra_op_threads=settings.infer_threads,
        prefer_cuda=settings.prefer_cuda,
    )
    timings = rt.warmup(settings.warmup_counts())
    return rt, timings


def _redacted(url: str) -> str:
    """The URL without credentials: redis://user:password@host -> redis://***@host, and a
    `password=` query parameter (unix:// URLs) -> password=***."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", url)


def drain_on_sigterm(app: FastAPI, drain_s: float) -> Callable[[], None]:
    """Put a drain in front of the server's own SIGTERM handling: /readyz turns 503 and
    answers close their connections for `drain_s`, then the server's handler runs (stop
    accepting, finish in-flight requests). A second SIGTERM skips the rest of the drain.
    Only in the main thread (where the server installed its handler); returns the undo."""
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread():
        return lambda: None
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):
        return lambda: None
    loop = asyncio.get_running_loop()

    def stop(sig: int) -> None:
        signal.signal(signal.SIGTERM, server_handler)
        server_handler(sig, None)

    def on_sigterm(sig: int, _frame: object) -> None:
        if app.state.shutting_down:
            stop(sig)
            return
        app.state.shutting_down = True
        log.warning("SIGTERM: draining for %.1f s (readyz 503, connections closed)", drain_s)
        loop.call_soon_threadsafe(loop.call_later, drain_s, stop, sig)

    def undo() -> None:
        signal.signal(signal.SIGTERM, server_handler)

    signal.signal(signal.SIGTERM, on_sigterm)
    return undo


def push_listener(
    client: Client,
    freshness: Freshness,
    metrics: Metrics,
    track: bool,
    control: dict[bytes, Callable[[bytes], None]],
) -> InvalidationListener:
    """The push channel: sequence keys (ifa:seq:{user}) to users for `freshness` when
    `track`, and the `control` channels (the sibling workers' reloads, the fleet's forgets)."""
    prefix = seq_key("").partition("{")[0] if track else None

    def on_keys(keys: list[bytes] | None) -> None:
        if keys is None:  # FLUSHALL / FLUSHDB
            freshness.invalidate_all()
            return
        metrics.push_invalidations.inc(len(keys))
        for key in keys:
            try:
                freshness.invalidate(user_of_seq_key(key))
            except ValueError:  # a key under the prefix that seq_key did not write
                freshness.invalidate_all()

    def on_state(up: bool) -> None:
        if track:
            freshness.set_up(up)
            metrics.push_channel_up.set(1 if up else 0)

    if isinstance(client, aioredis.RedisCluster):
        cluster = client

        async def discover() -> list[NodeAddress]:
            return await cluster_primaries(cluster)

        return InvalidationListener(
            discover, prefix, on_keys, on_state, channels=control, topology_interval_s=1.0
        )
    node = single_node(client.connection_pool)

    async def one() -> list[NodeAddress]:
        return [node]

    return InvalidationListener(one, prefix, on_keys, on_state, channels=control)


async def warm_routing(app: FastAPI) -> None:
    """FastAPI builds every route's request state on the first request it routes (about
    1.5 ms a route on the 2-core box): pay that at start, not inside the first /rank's
    budget (it counted as queue wait and could shed the first request). One request to
    an unknown path walks every route; no "app" in the scope, so the 404 is answered
    here rather than raised."""
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/__warm_routing__",
        "raw_path": b"/__warm_routing__",
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": None,
        "server": None,
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: Any) -> None:
        return None

    await app.router(scope, receive, send)


async def start_rollout_from_settings(registry: ModelRegistry, settings: Settings) -> None:
    """IFA_CANDIDATE_VERSION / IFA_SHADOW_VERSION: start with a rollout in place (a
    restarted pod serves what the fleet serves). A failure keeps the stable version
    serving alone, and says so in the log."""
    if registry.slot is None or (
        settings.candidate_version is None and settings.shadow_version is None
    ):
        return
    try:
        await registry.start_rollout(
            settings.candidate_version,
            settings.candidate_share,
            settings.shadow_version,
            settings.shadow_rate,
        )
    except Exception as e:
        log.error("rollout from the settings not started: %s: %s", type(e).__name__, e)


def create_app(settings: Settings) -> FastAPI:
    metrics = Metrics(buffered=settings.metrics_flush_ms > 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded: RedisServer | None = None
        supervisor: asyncio.Task[None] | None = None
        url = settings.redis_url
        if url is None:
            embedded = RedisServer(settings.embedded_redis_dir, port=None, persist=True)
            await asyncio.to_thread(embedded.start)
            url = embedded.url
            supervisor = asyncio.get_running_loop().create_task(supervise(embedded))
            app.state.embedded_redis = embedded
            app.state.redis_mode = f"embedded ({embedded.socket_path})"
            log.warning(
                "IFA_REDIS_URL is unset: started an embedded redis-server, data in %s",
                embedded.data_dir,
            )
        else:
            kind = "cluster" if settings.redis_cluster else "external"
            app.state.redis_mode = f"{kind} ({_redacted(url)})"
        client = make_client(
            url, settings.redis_timeout_ms, settings.redis_max_connections, settings.redis_cluster
        )
        store = RedisSequenceStore(
            client,
            timeout_ms=settings.redis_timeout_ms,
            idempotency_ttl_s=settings.idempotency_ttl_s,
            state_ttl_s=settings.state_ttl_s,
            wait_replicas=settings.events_wait_replicas,
            wait_ms=settings.events_wait_ms,
            on_error=lambda op: metrics.redis_errors.labels(op).inc(),
        )
        pool = InferencePool(settings.infer_workers)
        writeback = StateWriteBack(store, max_pending=settings.state_cache_size)
        writeback.start()
        registry = ModelRegistry(settings, metrics, partial(load_runtime, settings))
        freshness = Freshness(settings.state_cache_size, settings.push_max_staleness_ms / 1e3)
        forgotten = Forgotten()
        states = StateResolver(settings, store, metrics, pool, writeback, freshness, forgotten)
        batcher = ScoreBatcher(
            pool,
            max_delay_us=settings.batch_max_delay_us,
            max_batch=settings.batch_max_size,
            inline_ms=settings.inline_score_ms,
            on_batch=metrics.score_batch_size.observe,
        )
        per_iteration = settings.starts_per_iteration
        turnstile = Turnstile(per_iteration) if per_iteration else None
        app.state.rank = RankUseCase(settings, metrics, pool, registry, states, batcher, turnstile)
        impressions: ImpressionLog | None = None
        if settings.impression_log:
            impressions = ImpressionLog(
                client,
                shards=settings.impression_shards,
                max_len=max(1, settings.impression_max_len // settings.impression_shards),
                sample_rate=settings.impression_sample_rate,
                queue_size=settings.impression_queue,
                timeout_s=3 * settings.redis_timeout_ms / 1e3,
                on_logged=metrics.impressions_logged.inc,
                on_dropped=lambda reason, n: metrics.impressions_dropped.labels(reason).inc(n),
                mark=forgotten.mark,
                forgotten_since=forgotten.since,
                linger_s=settings.impression_linger_ms / 1e3,
            )
            impressions.start()
        app.state.impressions = impressions
        shadow = app.state.shadow = ShadowScorer(
            registry,
            states,
            batcher,
            metrics,
            impressions,
            budget_ms=settings.default_budget_ms,
            max_inflight=settings.shadow_max_inflight,
        )
        app.state.events = EventsUseCase(store, metrics, freshness, impressions)
        admin = app.state.admin = AdminUseCase(registry, store, settings.worker_group)
        forgetters: list[Forgetter] = [RedisForgetter(store)]
        if settings.impression_log:
            forgetters.append(ImpressionForgetter(store, settings.impression_shards))
        forget = app.state.forget = ForgetUseCase(
            forgetters, store, registry, freshness, forgotten, writeback, metrics
        )
        # Always listening (strict mode too): every replica must hear the forgets.
        control: dict[bytes, Callable[[bytes], None]] = {
            FORGET_CHANNEL.encode(): forget.on_broadcast
        }
        if settings.worker_group:
            control[control_channel(settings.worker_group).encode()] = admin.on_control
        track = settings.warm_check == "push"
        app.state.push = push_listener(client, freshness, metrics, track, control)
        listener = asyncio.get_running_loop().create_task(app.state.push.run())
        await registry.load_at_start(settings.model_version)
        await start_rollout_from_settings(registry, settings)
        await warm_routing(app)
        # A worker that started before its control channel was subscribed would miss a
        # reload or rollout its siblings announce meanwhile; Redis down only delays this.
        if not await app.state.push.started(PUSH_START_WAIT_S):
            log.warning("push channel not up %g s into start-up; serving anyway", PUSH_START_WAIT_S)
        if settings.balance_connections and settings.worker_group:
            # the directory `ifa-rank serve --workers N` prepares for its workers
            shared = os.environ.get(MULTIPROC_ENV)
            moved, passed = metrics.connections_moved.inc, metrics.connections_handed_off.inc
            if worker_share.join(shared, moved, passed) is not None:
                arrival.receive_handoffs(lambda: bool(app.state.shutting_down))
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        flusher = None
        if metrics.multiprocess and metrics.buffered:  # one process flushes at each scrape
            interval_s = settings.metrics_flush_ms / 1e3
            flusher = asyncio.get_running_loop().create_task(metrics.flush_every(interval_s))
        restore = drain_on_sigterm(app, settings.drain_s)
        try:
            yield
        finally:
            app.state.shutting_down = True
            listener.cancel()
            if flusher is not None:
                flusher.cancel()
            await shadow.close()
            await states.drain(DRAIN_TIMEOUT_S)
            await writeback.close(DRAIN_TIMEOUT_S)
            if impressions is not None:
                await impressions.close(DRAIN_TIMEOUT_S)
            await pool.shutdown()
            await client.aclose()
            if supervisor is not None:
                supervisor.cancel()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
            restore()
            arrival.stop_handoffs()
            worker_share.leave()
            metrics.close()
            log.info("shut down")

    app = RankApp(
        title="ifa-rank",
        version="0.1.0",
        summary="Online reranking with IFA: whole candidate sets against lifelong histories",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.redis_mode = "not started"
    app.state.embedded_redis = None
    app.state.impressions = None  # the ImpressionLog when IFA_IMPRESSION_LOG
    app.state.shadow = None  # the ShadowScorer (scores a rollout's shadow version)
    app.state.push = None  # the InvalidationListener (push mode's tracking, control channels)
    app.state.shutting_down = False
    install_error_handlers(app)
    app.include_router(router)

    # The last is the outermost: metrics see every answer, 413s included.
    def draining() -> bool:
        return bool(app.state.shutting_down)

    body_rules = BodyRules(settings.max_body_bytes, settings.body_timeout_s)
    ours = [
        Middleware(DrainMiddleware, draining=draining),
        Middleware(BodyLimitMiddleware, rules=body_rules),
        Middleware(RequestMetricsMiddleware, metrics=metrics),
    ]
    for m in ours:
        app.add_middleware(m.cls, *m.args, **m.kwargs)
    # POST /rank: the same rules in one coroutine, no router (service/http/inline_rank.py)
    app.fast = InlineRank(app.state, metrics, body_rules, draining)
    return app


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for name in ("service", "ifa_common"):
        logging.getLogger(name).setLevel(level.upper())


def app_from_env() -> FastAPI:
    """The `uvicorn --factory` entry point: settings from the IFA_* environment."""
    settings = Settings()
    configure_logging(settings.log_level)
    # Inference threads release the GIL inside ONNX Runtime but must re-take it to hand
    # results back; with the default 5 ms switch interval they queue behind the event
    # loop; 0.5 ms serves more requests a second under load (docs/performance.md).
    sys.setswitchinterval(0.0005)
    return create_app(settings)
