"""The events use case: append behaviour events to a user's sequence, idempotently."""

from __future__ import annotations

from collections.abc import Sequence

from ifa_common.records import UNKNOWN_CATEGORY, make_events, pack
from service.engine.freshness import Freshness
from service.metrics import Metrics
from service.store.impressions import Click, ImpressionLog
from service.store.redis_store import AppendResult, SequenceStore


class EventsUseCase:
    def __init__(
        self,
        store: SequenceStore,
        metrics: Metrics,
        freshness: Freshness,
        impressions: ImpressionLog | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.freshness = freshness
        self.impressions = impressions

    async def append(
        self,
        user_id: str,
        item_id: Sequence[int],
        ts: Sequence[int],
        category: Sequence[int | None],
        action: Sequence[int],
        idempotency_key: str | None,
        request_id: Sequence[str | None] = (),
    ) -> AppendResult:
        """Events in the order given; a category of None is stored as unknown. An event
        with a `request_id` (the /rank answer it acts on) is also logged as a click."""
        cats = [UNKNOWN_CATEGORY if c is None else c for c in category]
        records = pack(make_events(list(item_id), list(ts), cats, list(action)))
        try:
            result = await self.store.append(user_id, records, idempotency_key)
        finally:
            # before the answer (and even when Redis failed after writing): the next
            # /rank through this replica asks Redis instead of trusting its cache
            self.freshness.invalidate(user_id)
        if not result.replayed:
            self.metrics.events_appended.inc(result.appended)
            if self.impressions is not None:
                for i, rid in enumerate(request_id):
                    if rid is not None:
                        click = Click(rid, user_id, int(item_id[i]), int(ts[i]), int(action[i]))
                        self.impressions.offer_click(click)
        return result
