"""POST /rank as one coroutine: the rules of our middlewares and of `RouteErrors`, applied
inline around the route's own `answer_rank`.

The general path for /rank ran six nested coroutines before the handler (our metrics,
body-limit and drain middlewares, the route's error mapping, each with its own receive
or send wrapper), Starlette's request and response objects, and the body read through
an async generator. Interleaved with the rest of a request each layer costs several
times what it costs in a loop; a scratch /rank without them served 5-7 % more warm
requests for the same CPU (docs/performance.md, "the sixth session of 2026-12-04"). Here
the same rules are called in line, from where they are defined:

* the request's clock and its metrics: `record_request` (RequestMetricsMiddleware);
* the body's limit and deadline: `BodyRules` (BodyLimitMiddleware);
* `Connection: close` while the process drains: `closing_headers` (DrainMiddleware);
* the validation and HTTP errors answered as the app's exception handlers answer them
  (RouteErrors); anything else propagates, and uvicorn answers 500 as before.

The answers, their headers and the metrics are the ones the middleware stack gives
(tests/service/test_fast_path.py compares the two).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi.exceptions import RequestValidationError
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.http.answered import AnsweredThen
from service.http.middleware import (
    ARRIVED,
    CLIENT_CLOSED,
    BodyRules,
    closing_headers,
    on_http_error,
    on_validation_error,
    record_request,
    send_json,
)
from service.http.routes import answer_rank
from service.metrics import Metrics


class InlineRank:
    """The ASGI app `RankApp.fast` runs for POST /rank."""

    def __init__(
        self,
        state: State,
        metrics: Metrics,
        body: BodyRules,
        draining: Callable[[], bool],
    ) -> None:
        self.state = state
        self.metrics = metrics
        self.body = body
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        notes = scope.setdefault("state", {})
        t0 = notes.setdefault(ARRIVED, time.perf_counter())
        status = 500  # what is counted when nothing could be answered
        sent = 0.0
        try:
            refused = self.body.refusal(scope)
            if refused is not None:
                status = refused[0]
                await send_json(send, *refused)  # says `Connection: close` already
                sent = time.perf_counter()
                return
            response = await self._answer(scope, receive)
            status = response.status_code
            headers = response.raw_headers
            if self.draining():
                headers = closing_headers(headers)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": response.body})
            sent = time.perf_counter()
            if isinstance(response, AnsweredThen):
                response.after_send()
            elif response.background is not None:  # as Starlette's Response runs it
                await response.background()
        except ClientDisconnect:
            status = CLIENT_CLOSED  # nothing can be sent; nothing went wrong here
        finally:
            record_request(self.metrics, "/rank", status, notes, t0, sent)

    async def _answer(self, scope: Scope, receive: Receive) -> Response:
        try:
            return await answer_rank(self.state, scope, await self.body.read(receive))
        except RequestValidationError as e:
            return await on_validation_error(Request(scope, receive), e)
        except StarletteHTTPException as e:
            return await on_http_error(Request(scope, receive), e)
