"""`ifa-rank serve`: the service under uvicorn (uvloop + httptools, app factory).

One worker process per pod (or per `serve`): the state cache, the inference executor
and the Prometheus registry are per process, so several workers in one process group
would each keep a partial cache and a partial registry (a scrape would see one worker).
Scale with replicas instead; `--workers` other than 1 is refused with that explanation.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from pydantic import ValidationError


def serve(args: argparse.Namespace) -> int:
    workers = int(getattr(args, "workers", 1) or 1)
    if workers != 1:
        print(
            "ifa-rank serve: --workers must be 1. The service runs one process per pod "
            "(its state cache and Prometheus registry are per process, so metrics stay "
            "whole); scale out with replicas and use IFA_INFER_WORKERS for parallel "
            "inference inside the process.",
            file=sys.stderr,
        )
        return 2
    from service.settings import Settings

    try:
        settings = Settings()  # fail here, with the field named, not inside uvicorn
    except ValidationError as e:
        print(f"ifa-rank serve: invalid IFA_* settings:\n{e}", file=sys.stderr)
        return 2

    import uvicorn

    uvicorn.run(
        "service.app:app_from_env",
        factory=True,
        host=args.host,
        port=int(args.port),
        workers=1,
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
    return 0
