"""`ifa-rank serve`: the service under uvicorn (uvloop + httptools, app factory).

`--workers N` (or IFA_WORKERS) runs N worker processes behind one port, so the Python
work of requests uses N cores. This parent then prepares what the workers share:

* the embedded redis-server, started once here when IFA_REDIS_URL is unset (each worker
  would otherwise start its own);
* PROMETHEUS_MULTIPROC_DIR, a fresh directory where every worker writes its metric
  values, so that `/metrics` from any worker is the sum over all of them;
* IFA_WORKER_GROUP, the name of the Redis pub/sub channel on which a model reload on one
  worker is announced to the others.

Each worker keeps its own state cache (warm states reach the others through Redis) and
its own IFA_MAX_INFLIGHT.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError


def serve(args: argparse.Namespace) -> int:
    from service.settings import Settings

    try:
        settings = Settings()  # fail here, with the field named, not inside uvicorn
    except ValidationError as e:
        print(f"ifa-rank serve: invalid IFA_* settings:\n{e}", file=sys.stderr)
        return 2
    given = getattr(args, "workers", None)
    workers = int(given) if given is not None else settings.workers
    if workers < 1:
        print("ifa-rank serve: --workers must be at least 1", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        if workers > 1:
            stack.enter_context(_shared_by_workers(settings))
        _run(args, settings, workers)
    return 0


@contextlib.contextmanager
def _shared_by_workers(settings: Any) -> Iterator[None]:
    from service.metrics import MULTIPROC_ENV
    from service.store.embedded_redis import RedisServer

    saved = {k: os.environ.get(k) for k in (MULTIPROC_ENV, "IFA_WORKER_GROUP", "IFA_REDIS_URL")}
    given = saved[MULTIPROC_ENV]  # an operator's directory (it must start empty): kept
    metrics_dir = given or tempfile.mkdtemp(prefix="ifa-metrics-")
    redis: RedisServer | None = None
    try:
        os.environ[MULTIPROC_ENV] = metrics_dir
        os.environ["IFA_WORKER_GROUP"] = uuid.uuid4().hex[:16]
        if settings.redis_url is None:
            redis = RedisServer(settings.embedded_redis_dir, port=None, persist=True).start()
            os.environ["IFA_REDIS_URL"] = redis.url
            print(f"ifa-rank serve: embedded redis-server for the workers at {redis.url}")
        yield
    finally:
        if redis is not None:
            redis.stop()
        if not given:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run(args: argparse.Namespace, settings: Any, workers: int) -> None:
    import uvicorn

    uvicorn.run(
        "service.app:app_from_env",
        factory=True,
        host=args.host,
        port=int(args.port),
        workers=workers,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=(
            "service.http.arrival:ArrivalHttpToolsProtocol"
            if importlib.util.find_spec("httptools")
            else "h11"
        ),
        lifespan="on",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )
