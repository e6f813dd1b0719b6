"""HTTP plumbing: orjson responses, error handlers, body-size limit, request metrics.

Pure ASGI middlewares (no BaseHTTPMiddleware: it would copy every body and add a task
per request on the hot path).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import API_ROUTES, Metrics

M = TypeVar("M", bound=BaseModel)

NOT_COUNTED: Final = frozenset({"/healthz", "/readyz", "/metrics"})
COUNTED_ROUTES: Final = frozenset(API_ROUTES)
# The client went away before its answer was sent (nginx's "client closed request"): not
# a server fault, so never counted as a 5xx (a dropping client must not fire 5xx alerts).
CLIENT_CLOSED: Final = 499
ARRIVED: Final = "arrived"  # scope["state"] key: perf_counter() when the request arrived
# (set by service.http.arrival's protocol when uvicorn runs it, else by the middleware)


class JSONResponse(Response):
    """JSON rendered by orjson (FastAPI's ORJSONResponse is deprecated)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(
    status_code: int,
    detail: Any,
    error: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if error is not None:
        body["error"] = error
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))


class BodyTimeout(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"request body not received within {timeout_s:g} s")


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


def _field(loc: Any) -> str:
    parts = [str(p) for p in (loc or ()) if p != "body"]
    return ".".join(parts) if parts else "body"


def parse_body(model: type[M], raw: bytes) -> M:
    """A JSON body validated in one pass by pydantic-core (no intermediate dicts: about
    3x faster than json.loads + validation for a 500-candidate /rank). Errors come out
    as FastAPI's, so the 422 handler formats them the same way."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = [
            {**err, "loc": ("body", *err["loc"])}
            for err in e.errors(include_url=False, include_input=False)
        ]
        raise RequestValidationError(errors) from None


def validation_error(field: str, msg: str, type_: str = "value_error") -> RequestValidationError:
    loc = ("body", *field.split("."))
    return RequestValidationError([{"loc": loc, "msg": msg, "type": type_}])


def _compact(err: Mapping[str, Any]) -> dict[str, Any]:
    # Never echo `input` back (it can be a 2,000-element list); ctx may hold exceptions.
    msg = str(err.get("msg", "invalid value"))
    ctx = err.get("ctx") or {}
    if err.get("type") == "json_invalid" and isinstance(ctx.get("error"), str):
        msg = f"{msg}: {ctx['error']}"
    return {"loc": [str(p) for p in err.get("loc", ())], "msg": msg, "type": str(err.get("type"))}


async def on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [_compact(e) for e in exc.errors()][:20]
    first = errors[0] if errors else {"loc": ["body"], "msg": "invalid request"}
    return error_response(422, errors, f"{_field(first['loc'])}: {first['msg']}")


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, exc.detail, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)
    # Starlette's HTTPException covers FastAPI's and the router's own 404 / 405.
    app.add_exception_handler(StarletteHTTPException, on_http_error)


async def send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def closing_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    """A response's headers with `Connection: close` (and no other Connection header)."""
    kept = [(k, v) for k, v in headers if k != b"connection"]
    return [*kept, (b"connection", b"close")]


class DrainMiddleware:
    """While the process drains (after SIGTERM), every answer says `Connection: close`, so
    a keep-alive client opens its next request elsewhere instead of sending it into a
    socket the server is about to close (which resets it)."""

    def __init__(self, app: ASGIApp, draining: Callable[[], bool]) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.draining():
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": closing_headers(message.get("headers", []))}
            await send(message)

        await self.app(scope, receive, closing)


class _BodyWatch:
    """The deadlines of the body reads waiting on one event loop, checked by one timer for
    all of them instead of a timer each (an `asyncio.timeout` per read cost a warm /rank
    6-7 µs alone, several times that between its other work): a read registers its task
    and deadline while it waits; a tick every `tick_s`, armed while any read waits,
    cancels the overdue ones, and the read turns that cancellation into a 408."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float) -> None:
        self.loop = loop
        self.tick_s = tick_s
        self.waiting: dict[asyncio.Task[Any], float] = {}
        self.fired: set[asyncio.Task[Any]] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.waiting[task] = deadline
        if self.timer is None:
            self.timer = self.loop.call_later(self.tick_s, self._tick)

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether the watch cancelled `task` (once: it forgets it)."""
        if task in self.fired:
            self.fired.discard(task)
            return True
        return False

    def _tick(self) -> None:
        self.timer = None
        now = self.loop.time()
        for task, deadline in list(self.waiting.items()):
            if deadline <= now:
                del self.waiting[task]
                self.fired.add(task)
                task.cancel()
        if self.waiting:
            self.timer = self.loop.call_later(self.tick_s, self._tick)


class BodyRules:
    """413 for a body over `limit` bytes: by Content-Length up front, else while streaming;
    408 for a body whose next part takes over `timeout_s` to arrive (a slow client must
    not hold a request, and its connection, open indefinitely). Applied by
    BodyLimitMiddleware, and inline by /rank's fast path (service/http/inline_rank.py)."""

    def __init__(self, limit: int, timeout_s: float = 10.0) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        # a part is refused between timeout_s and timeout_s + tick after its read began
        self.tick_s = min(1.0, timeout_s / 4)
        self._watch: _BodyWatch | None = None

    def refusal(self, scope: Scope) -> tuple[int, dict[str, Any]] | None:
        """The answer to a request refused by its Content-Length, before its body is read."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    return 400, {"detail": "invalid Content-Length", "error": "content-length"}
                if int(value) > self.limit:
                    detail = f"request body exceeds {self.limit} bytes"
                    return 413, {"detail": detail, "error": f"body: {detail}"}
        return None

    async def next_part(self, receive: Receive, received: int) -> tuple[Message, int]:
        """The next message of a body, and the body's bytes so far with it; raises
        BodyTimeout or BodyTooLarge."""
        loop = asyncio.get_running_loop()
        watch = self._watch
        if watch is None or watch.loop is not loop:
            watch = self._watch = _BodyWatch(loop, self.tick_s)
        task = asyncio.current_task()
        assert task is not None  # an ASGI app runs in a task
        watch.add(task, loop.time() + self.timeout_s)
        try:
            message = await receive()
        except asyncio.CancelledError:
            if watch.expired(task):
                task.uncancel()
                raise BodyTimeout(self.timeout_s) from None
            raise
        finally:
            watch.waiting.pop(task, None)
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)
        return message, received

    async def read(self, receive: Receive) -> bytes:
        """The whole body (what Starlette's `Request.body()` returns), within the rules;
        ClientDisconnect when the client leaves first."""
        parts: list[bytes] = []
        received = 0
        while True:
            message, received = await self.next_part(receive, received)
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            parts.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return parts[0] if len(parts) == 1 else b"".join(parts)


class BodyLimitMiddleware:
    """BodyRules around any app: the Content-Length refusals answered here, the streaming
    limit and the deadline applied to each `receive` of the body. create_app passes the
    same rules to /rank's fast path, so both keep their deadlines on one watch."""

    def __init__(self, app: ASGIApp, rules: BodyRules) -> None:
        self.app = app
        self.rules = rules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.rules.refusal(scope)
        if refused is not None:
            await send_json(send, *refused)
            return
        received = 0
        rules = self.rules
        complete = False

        async def limited() -> Message:
            nonlocal received, complete
            if complete:  # after the body: e.g. waiting for a disconnect, not timed
                return await receive()
            message, received = await rules.next_part(receive, received)
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)


def _template(path: str) -> str:
    """The counted route of a path with a parameter (one series per route, not per user)."""
    return "/users/{user_id}" if path.startswith("/users/") else "other"


class RequestMetricsMiddleware:
    """ifa_rank_request_duration_seconds{outcome} for /rank; response codes per API route.

    Outermost of ours, so its clock starts first: the arrival time it puts in the scope
    state is where a request's budget starts (time spent waiting for the event loop
    counts against the budget, as the `queue` stage)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in NOT_COUNTED:
            await self.app(scope, receive, send)
            return
        # From the first byte in (the protocol's stamp under `ifa-rank serve`), not from
        # here: under load a request waits for the event loop before any middleware runs,
        # and that wait is part of what the client sees.
        t0 = scope.setdefault("state", {}).setdefault(ARRIVED, time.perf_counter())
        status = 500
        sent = 0.0  # when the answer's last bytes were handed to the transport

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                sent = time.perf_counter()

        try:
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:
            status = CLIENT_CLOSED  # nothing can be sent; nothing went wrong here
        finally:
            record_request(self.metrics, path, status, scope.get("state") or {}, t0, sent)


def record_request(
    metrics: Metrics, path: str, status: int, state: Mapping[str, Any], t0: float, sent: float
) -> None:
    """A counted request's metrics, once it is answered (`sent`: when its answer's last
    bytes went to the transport, 0 when none did): by RequestMetricsMiddleware, and by
    /rank's fast path (service/http/inline_rank.py)."""
    route = path if path in COUNTED_ROUTES else _template(path)
    metrics.count_response(route, status)
    if path == "/rank":
        if status == 200:
            outcome = "degraded" if state.get("degraded") else "ok"
        elif status == 503:
            outcome = "rejected"
        else:
            outcome = "error"
        # the client's wait: to the answer's send, not to the bookkeeping after it
        done = sent or time.perf_counter()
        metrics.observe_request(outcome, state.get("model_version"), done - t0)
