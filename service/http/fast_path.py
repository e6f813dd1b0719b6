"""POST /rank straight to its handler, around Starlette's router and FastAPI's endpoint
machinery: the same handler, the same rules of our middlewares, the same error answers.

Per request the full stack costs more than the answer's own serialisation: Starlette's
error and exception middlewares, a regex match against every route, and FastAPI's
dependency solving (for a handler that takes only the request). For /rank, the one route
whose rate matters, `RankApp` sends the request to `fast` (built by create_app:
service/http/inline_rank.py, our middlewares' rules and the route's error answers in one
coroutine). Every other request, and any other method or path spelling of /rank, takes
the ordinary way (405, 404, the OpenAPI document: the APIRoute stays registered and
documented).

An unexpected exception is re-raised as Starlette's ServerErrorMiddleware does: the
server (uvicorn) answers 500 and logs it; the 500 is counted in the metrics.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send


class RankApp(FastAPI):
    """The service's FastAPI app, with `fast` (set once the middlewares are known) taking
    POST /rank."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.fast is not None
            and scope["type"] == "http"
            and scope["path"] == "/rank"
            and scope["method"] == "POST"
        ):
            scope["app"] = self  # what Starlette sets: request.app is this app
            await self.fast(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
