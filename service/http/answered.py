"""A JSON answer that does its request's bookkeeping once it is sent.

The client does not wait for what only the service needs: the metrics of the answer, the
cost model's update, the impression record, the shadow's sample. The event loop (uvloop)
sends a write as it is made and the cork sends the head with the body
(service/http/cork.py), so the answer is on the wire before any of that runs. The
bookkeeping still runs in the request's task, before the event loop reads the next
request, so whatever the client asks next (its /metrics, say) sees it. A failure in it
is logged: the answer has gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)


class AnsweredThen(Response):
    media_type = "application/json"

    def __init__(self, payload: bytes, then: Callable[[], None]) -> None:
        super().__init__(payload)
        self._then = then

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)
        self.after_send()

    def after_send(self) -> None:
        """The bookkeeping, once the answer is sent (by `__call__`, or by whoever sent
        `body` itself: /rank's fast path)."""
        try:
            self._then()
        except Exception:
            log.exception("the bookkeeping after an answer failed (the answer was sent)")
