"""The model registry: which model versions serve, loaded, verified and warmed off the
event loop and swapped in atomically. Requests in flight keep the slot they started with;
an old slot's sessions are freed when the last of them finishes (its state cache gives its
share of the shared budget back at once).

A rollout serves up to three versions at once: the stable slot; a candidate slot that
answers the users whose `share_of(user)` is below the rollout's share (a stable hash: a
user always sees the same version); a shadow slot scored on a sample of requests, its
scores logged and never returned (`service.usecases.shadow`)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from service.engine.cost import CostModel, Warmup
from service.engine.slot import ModelSlot, Runtime
from service.engine.state_cache import CacheBudget, StateCache
from service.metrics import Metrics, ServedVersion
from service.settings import Settings

log = logging.getLogger(__name__)

Loader = Callable[[str | None], tuple[Runtime, Warmup]]


class ModelNotReady(RuntimeError):
    """No model is loaded (yet, or the last load failed)."""

    retry_after_s = 5


class NoRollout(RuntimeError):
    """Promote without a candidate."""


def share_of(user: str) -> float:
    """A stable point in [0, 1) for the user id: the same on every replica and restart."""
    digest = hashlib.blake2b(user.encode(), digest_size=8, person=b"ifa-rollout").digest()
    return int.from_bytes(digest, "little") / 2**64


@dataclass(frozen=True, slots=True)
class Rollout:
    """Immutable: a change swaps the whole object, so a request reads one consistent view."""

    candidate: ModelSlot | None
    share: float  # of users on the candidate
    shadow: ModelSlot | None
    shadow_rate: float  # of answered requests also scored by the shadow


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, loader: Loader) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.slot: ModelSlot | None = None  # the stable version
        self.rollout: Rollout | None = None
        self.load_error: str | None = None
        self.budget = CacheBudget(
            settings.state_cache_size, max_bytes=int(settings.state_cache_mb * 2**20)
        )
        self._lock = asyncio.Lock()

    def current(self) -> ModelSlot:
        """The stable slot; ModelNotReady when there is none."""
        if self.slot is None:
            raise ModelNotReady(self.load_error or "model not loaded")
        return self.slot

    def for_user(self, user: str) -> ModelSlot:
        """The slot that answers `user`: without a rollout, one attribute check more than
        `current()` (the warm path's cost)."""
        slot = self.slot
        if slot is None:
            raise ModelNotReady(self.load_error or "model not loaded")
        ro = self.rollout
        if ro is None or ro.candidate is None:
            return slot
        return ro.candidate if share_of(user) < ro.share else slot

    def served(self) -> list[tuple[str, ModelSlot, float]]:
        """(role, slot, share of users) of every version served now, stable first."""
        if self.slot is None:
            return []
        ro = self.rollout
        share = ro.share if ro is not None and ro.candidate is not None else 0.0
        out = [("stable", self.slot, 1.0 - share)]
        if ro is not None and ro.candidate is not None:
            out.append(("candidate", ro.candidate, ro.share))
        if ro is not None and ro.shadow is not None:
            out.append(("shadow", ro.shadow, ro.shadow_rate))
        return out

    async def _open(self, version: str | None) -> ModelSlot:
        runtime, warm = await asyncio.to_thread(self.loader, version)
        return ModelSlot(
            runtime=runtime,
            cache=StateCache(self.budget.capacity, budget=self.budget),
            cost=CostModel.from_warmup(warm),
        )

    def _published(self) -> None:
        self.metrics.set_models(
            [ServedVersion(s.version, s.runtime.provider, role) for role, s, _ in self.served()]
        )

    async def load(self, version: str | None) -> ModelSlot:
        """Load, verify and warm `version` off the event loop, then swap it in as the
        stable version (a rollout in progress goes on against it)."""
        async with self._lock:
            slot = await self._open(version)
            old, self.slot = self.slot, slot
            if old is not None:
                old.cache.close()
            self.load_error = None
            self._without(slot.version)
            self._published()
            runtime = slot.runtime
            log.info(
                "serving model %s on %s (%s)",
                runtime.version,
                runtime.provider,
                ",".join(runtime.providers),
            )
            return slot

    async def start_rollout(
        self, candidate: str | None, share: float, shadow: str | None, shadow_rate: float
    ) -> Rollout:
        """Load and warm the candidate and the shadow (off the event loop), then route to
        them; a rollout in progress is replaced (a version in both is loaded afresh)."""
        async with self._lock:
            stable = self.current()
            for v in (candidate, shadow):
                if v is not None and v == stable.version:
                    raise ValueError(f"{v} is the stable version")
            if candidate is not None and candidate == shadow:
                raise ValueError("candidate and shadow must be different versions")
            old = self.rollout
            # a version already in the rollout keeps its slot (and its warm cache): a
            # share changed from 1 % to 10 % moves users, it reloads nothing
            kept = [s for s in (old.candidate, old.shadow) if s is not None] if old else []
            reuse = {s.version: s for s in kept}
            fresh: list[ModelSlot] = []
            try:
                slots: list[ModelSlot | None] = []
                for v in (candidate, shadow):
                    if v is None:
                        slots.append(None)
                    elif v in reuse:
                        slots.append(reuse[v])
                    else:
                        fresh.append(await self._open(v))
                        slots.append(fresh[-1])
            except BaseException:
                for s in fresh:
                    s.cache.close()
                raise
            cand, shad = slots
            # a name like `latest` is only known to be the stable version once loaded
            loaded = [s.version for s in slots if s is not None]
            if stable.version in loaded or len(set(loaded)) < len(loaded):
                for s in fresh:
                    s.cache.close()
                raise ValueError(
                    f"{'/'.join(loaded)}: the stable version or twice the same version"
                )
            ro = Rollout(cand, share if cand is not None else 0.0, shad, shadow_rate)
            self._end_rollout(ro, keep=(cand, shad))
            log.info(
                "rollout: candidate %s on %.1f%% of users, shadow %s on %.1f%% of requests",
                candidate,
                100 * ro.share,
                shadow,
                100 * shadow_rate,
            )
            return ro

    async def promote(self) -> ModelSlot:
        """The candidate becomes the stable version, its warm cache and all (no reload);
        the shadow is dropped with the rollout."""
        async with self._lock:
            ro = self.rollout
            if ro is None or ro.candidate is None:
                raise NoRollout("no candidate to promote")
            old, self.slot = self.slot, ro.candidate
            self._end_rollout(None, keep=(ro.candidate,))  # the shadow ends with it
            if old is not None:
                old.cache.close()
            log.info("promoted %s to stable", ro.candidate.version)
            return ro.candidate

    async def drop(self) -> Rollout | None:
        """Candidate and shadow stop at once; the stable version answers everyone."""
        async with self._lock:
            ro = self.rollout
            self._end_rollout(None)
            return ro

    def _without(self, version: str) -> None:
        """A reload to a version the rollout serves too: that part of the rollout ends
        (one slot per version; the reloaded one now answers every user)."""
        ro = self.rollout
        if ro is None:
            return
        cand = ro.candidate if ro.candidate and ro.candidate.version != version else None
        shad = ro.shadow if ro.shadow and ro.shadow.version != version else None
        if (cand, shad) != (ro.candidate, ro.shadow):
            left = Rollout(cand, ro.share if cand else 0.0, shad, ro.shadow_rate)
            self._end_rollout(left if cand or shad else None, keep=(cand, shad))

    def _end_rollout(self, new: Rollout | None, keep: tuple[ModelSlot | None, ...] = ()) -> None:
        old, self.rollout = self.rollout, new
        if old is not None:
            for s in (old.candidate, old.shadow):
                if s is not None and all(s is not k for k in keep):
                    s.cache.close()
        self._published()

    async def load_at_start(self, version: str) -> None:
        """The lifespan's load: a failure keeps the process up and not ready (/readyz and
        the log say why), so a bad artifact does not restart-loop every pod."""
        try:
            await self.load(version)
        except Exception as e:
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("no model loaded: %s", self.load_error)
