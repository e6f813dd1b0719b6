"""POST /rank straight to its handler, around Starlette's router and FastAPI's endpoint
machinery: the same handler, the same middlewares of ours, the same error answers.

Per request the full stack costs more than the answer's own serialisation: Starlette's
error and exception middlewares, a regex match against every route, and FastAPI's
dependency solving (for a handler that takes only the request). For /rank, the one route
whose rate matters, `RankApp` sends the request through `fast` (built by create_app):
our metrics, body-limit and drain middlewares around `RouteErrors`, which maps the
handler's validation and HTTP errors with the app's own exception handlers. Every other
request, and any other method or path spelling of /rank, takes the ordinary way (405,
404, the OpenAPI document: the APIRoute stays registered and documented).

An unexpected exception is re-raised as Starlette's ServerErrorMiddleware does: the
server (uvicorn) answers 500 and logs it; the metrics middleware counts the 500.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.http.middleware import on_http_error, on_validation_error

Endpoint = Callable[[Request], Awaitable[Response]]


class RouteErrors:
    """One endpoint as an ASGI app, with the app's answers to its expected errors."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.endpoint(request)
        except RequestValidationError as e:
            response = await on_validation_error(request, e)
        except StarletteHTTPException as e:
            response = await on_http_error(request, e)
        await response(scope, receive, send)


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
