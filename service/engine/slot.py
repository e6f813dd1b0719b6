"""A loaded model version: the runtime seam it is used through, its own state cache and
its score-time fit. A request takes the slot once at its start and uses it to the end,
so a reload never mixes versions inside one request."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ifa_common.state import UserState
from service.engine.cost import CostModel
from service.engine.state_cache import StateCache


class Runtime(Protocol):
    """What the service uses of `service.engine.runtime.ModelRuntime` (docs/CONTRACTS.md)."""

    version: str
    provider: str
    providers: list[str]
    manifest: dict[str, Any]
    dims: tuple[int, int, int]

    def empty_state(self) -> UserState: ...
    def build_state(self, events: np.ndarray) -> UserState: ...
    def fold(self, state: UserState, partial: UserState) -> UserState: ...
    def score(self, state: UserState, items: np.ndarray) -> np.ndarray: ...
    def score_batch(
        self, states: Sequence[UserState], items: Sequence[np.ndarray]
    ) -> list[np.ndarray]: ...
    def serialize_state(self, state: UserState) -> bytes: ...
    def deserialize_state(self, buf: bytes) -> UserState: ...


@dataclass
class ModelSlot:
    """One loaded model version with its own state cache and cost model.

    A request takes the slot once at its start and uses it to the end, so a reload
    (which swaps `ModelRegistry.slot`) never mixes versions inside one request.
    """

    runtime: Runtime
    cache: StateCache
    cost: CostModel = field(default_factory=CostModel)
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.runtime.version
