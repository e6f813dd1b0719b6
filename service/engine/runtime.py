"""The serving side of the model: two ONNX Runtime sessions and the numpy state contract.

    rt = ModelRuntime.load(artifacts_dir, version=None, intra_op_threads=1, prefer_cuda=True)
    partial = rt.build_state(events)          # EVENT_DTYPE (N,), any N >= 0
    state = rt.fold(cached, partial)          # exact: same `fold` as training and tests
    logits = rt.score(state, items)           # int64 (M,) raw item ids -> float32 (M,)

Raw ids are bucketed here with `ifa_common.hashing` (the graphs take bucket indices);
unknown categories (-1) are looked up in the artifact's item table. No torch, no
`model_export`, no web framework: this module must import in the serving image.
Every method is safe to call from several threads at once (ORT sessions are, and the
runtime holds no per-call mutable state).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from ifa_common import hashing
from ifa_common.graphs import (
    ITEMS_FILE,
    SCORER_FILE,
    SCORER_INPUTS,
    SCORER_OUTPUTS,
    STATE_FILE,
    STATE_INPUTS,
    STATE_OUTPUTS,
)
from ifa_common.items import ItemTable, load_items
from ifa_common.manifest import (
    ArtifactError,
    ArtifactWrongModel,
    load_manifest,
    resolve_version,
    verify_files,
)
from ifa_common.records import EVENT_DTYPE
from ifa_common.state import UserState, deserialize, fold, serialize
from service.engine.cost import Warmup
from service.engine.ort_session import (
    CUDA,
    check_io,
    open_session,
    providers,
    runner,
    session_options,
)

log = logging.getLogger(__name__)

# Events per state.onnx call; longer histories are built chunk by chunk and folded, which
# keeps the graph's intermediates bounded (~10 arrays of N x H x F floats) at no
# measurable cost against larger chunks (docs/performance.md).
DEFAULT_CHUNK_EVENTS: Final = 16_384


class ModelRuntime:
    """A loaded, verified artifact version. Build with `ModelRuntime.load`."""

    def __init__(
        self,
        *,
        version_dir: Path,
        manifest: dict[str, Any],
        state_session: ort.InferenceSession,
        scorer_session: ort.InferenceSession,
        item_ids: np.ndarray,
        item_categories: np.ndarray,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
    ) -> None:
        self.version_dir = version_dir
        self.manifest = manifest
        self.version: str = str(manifest["version"])
        dims = manifest["dims"]
        self.dims: tuple[int, int, int] = (
            int(dims["heads"]),
            int(dims["d_phi"]),
            int(dims["d_head"]),
        )
        self.decay: np.ndarray = np.asarray(dims["decay_per_second"], dtype=np.float64)
        self._item_buckets = int(dims["item_buckets"])
        self._category_buckets = int(dims["category_buckets"])
        self._action_buckets = int(dims["action_buckets"])
        self._run_state = runner(state_session)
        self._run_scorer = runner(scorer_session)
        self._items = ItemTable(item_ids, item_categories)
        self._chunk = max(1, int(chunk_events))
        self.providers: list[str] = list(scorer_session.get_providers())
        self.provider: str = "cuda" if CUDA in self.providers else "cpu"
        # Per-event and fixed cost of build_state in ms; replaced by `warmup`'s measurement.

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        artifacts_dir: str | Path,
        version: str | None = None,
        intra_op_threads: int = 1,
        prefer_cuda: bool = True,
        allow_spinning: bool = False,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
    ) -> ModelRuntime:
        """Resolve `version` (None/"latest": the `latest` pointer) inside `artifacts_dir`."""
        version_dir = resolve_version(Path(artifacts_dir), version)
        rt = cls.load_dir(
            version_dir,
            intra_op_threads=intra_op_threads,
            prefer_cuda=prefer_cuda,
            allow_spinning=allow_spinning,
            chunk_events=chunk_events,
        )
        if rt.version != version_dir.name:
            raise ArtifactError(
                f"{version_dir}: manifest version {rt.version!r} does not match its directory"
            )
        return rt

    @classmethod
    def load_dir(
        cls,
        version_dir: str | Path,
        intra_op_threads: int = 1,
        prefer_cuda: bool = True,
        allow_spinning: bool = False,
        chunk_events: int = DEFAULT_CHUNK_EVENTS,
    ) -> ModelRuntime:
        """Load one version directory (used by the exporter to check a fresh export)."""
        version_dir = Path(version_dir)
        manifest = load_manifest(version_dir)
        # Integrity first: nothing is parsed or handed to ORT before every sha256 matches.
        verify_files(version_dir, manifest)
        for key in ("version", "dims", "graphs", "files"):
            if key not in manifest:
                raise ArtifactError(f"{version_dir}: manifest lacks {key!r}")
        for name in (STATE_FILE, SCORER_FILE, ITEMS_FILE):
            if name not in manifest["files"]:
                raise ArtifactError(f"{version_dir}: manifest does not list {name}")
        options = session_options(intra_op_threads, allow_spinning)
        chosen = providers(prefer_cuda)
        state = open_session(version_dir / STATE_FILE, options, chosen)
        scorer = open_session(version_dir / SCORER_FILE, options, chosen)
        check_io(state, STATE_INPUTS, STATE_OUTPUTS, STATE_FILE)
        check_io(scorer, SCORER_INPUTS, SCORER_OUTPUTS, SCORER_FILE)
        item_ids, item_categories = load_items(version_dir / ITEMS_FILE)
        try:
            rt = cls(
                version_dir=version_dir,
                manifest=manifest,
                state_session=state,
                scorer_session=scorer,
                item_ids=item_ids,
                item_categories=item_categories,
                chunk_events=chunk_events,
            )
        except (KeyError, TypeError, ValueError) as e:  # dims the graphs cannot be fed with
            raise ArtifactError(f"{version_dir}: manifest dims unusable ({e!r})") from e
        log.info("loaded model %s on %s (%s)", rt.version, rt.provider, ",".join(rt.providers))
        return rt

    # ------------------------------------------------------------------ states
    def empty_state(self) -> UserState:
        return UserState.empty(*self.dims)

    def lookup_categories(self, items: np.ndarray) -> np.ndarray:
        """Raw item ids -> raw category ids from the item table; -1 where unknown."""
        return self._items.lookup(items)

    def build_state(self, events: np.ndarray) -> UserState:
        """A partial state from events (EVENT_DTYPE, time order not required), any N >= 0."""
        if events.dtype != EVENT_DTYPE:
            raise TypeError(f"expected EVENT_DTYPE events, got {events.dtype}")
        n = int(events.shape[0])
        if n <= self._chunk:
            return self._build_chunk(events)
        state = self._build_chunk(events[: self._chunk])
        for start in range(self._chunk, n, self._chunk):
            state = fold(state, self._build_chunk(events[start : start + self._chunk]), self.decay)
        return state

    def _build_chunk(self, events: np.ndarray) -> UserState:
        items = events["item_id"]
        cats = events["category"]
        unknown = cats < 0
        if unknown.any():
            cats = np.where(unknown, self.lookup_categories(items), cats)
        feeds = {
            "item": hashing.item_bucket(items, self._item_buckets),
            "category": hashing.category_bucket(cats, self._category_buckets),
            "action": hashing.action_bucket(events["action"], self._action_buckets),
            "ts": np.ascontiguousarray(events["ts"], dtype=np.int64),
        }
        S, z, m, t_ref = self._run_state(STATE_OUTPUTS, feeds)
        return UserState(S=S, z=z, m=m, t_ref=int(t_ref), n=int(events.shape[0]))

    def fold(self, state: UserState, partial: UserState) -> UserState:
        return fold(state, partial, self.decay)

    def serialize_state(self, state: UserState) -> bytes:
        return serialize(state, self.version)

    def deserialize_state(self, buf: bytes) -> UserState:
        """Raises StateVersionMismatch for a state of another model version."""
        return deserialize(buf, self.version, self.dims)

    # ------------------------------------------------------------------ scoring
    def _candidates(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = np.asarray(items, dtype=np.int64)
        if items.ndim != 1:
            raise ValueError(f"items must be 1-D, got shape {items.shape}")
        return (
            hashing.item_bucket(items, self._item_buckets),
            self._items.category_buckets(items, self._category_buckets),
        )

    def score(self, state: UserState, items: np.ndarray) -> np.ndarray:
        """Raw candidate item ids (M,) -> float32 logits (M,)."""
        item_b, cat_b = self._candidates(items)
        m = item_b.shape[0]
        if m == 0:
            return np.zeros(0, np.float32)
        feeds = {
            "S": np.ascontiguousarray(state.S, np.float32)[None],
            "z": np.ascontiguousarray(state.z, np.float32)[None],
            "m": np.ascontiguousarray(state.m, np.float32)[None],
            "n": np.array([state.n], np.int64),
            "item": item_b[None],
            "category": cat_b[None],
            "mask": np.ones((1, m), np.bool_),
        }
        (logits,) = self._run_scorer(SCORER_OUTPUTS, feeds)
        out: np.ndarray = logits[0]
        return out

    def score_batch(
        self, states: Sequence[UserState], items: Sequence[np.ndarray]
    ) -> list[np.ndarray]:
        """Several users in one scorer call; candidate sets are padded to a common M."""
        if len(states) != len(items):
            raise ValueError(f"{len(states)} states but {len(items)} candidate sets")
        if not states:
            return []
        prepared = [self._candidates(x) for x in items]
        sizes = [p[0].shape[0] for p in prepared]
        width = max(sizes)
        if width == 0:
            return [np.zeros(0, np.float32) for _ in sizes]
        b = len(states)
        item_b = np.zeros((b, width), np.int64)
        cat_b = np.zeros((b, width), np.int64)
        mask = np.zeros((b, width), np.bool_)
        for row, ((it, ca), size) in enumerate(zip(prepared, sizes, strict=True)):
            item_b[row, :size] = it
            cat_b[row, :size] = ca
            mask[row, :size] = True
        feeds = {
            "S": np.stack([s.S for s in states]).astype(np.float32, copy=False),
            "z": np.stack([s.z for s in states]).astype(np.float32, copy=False),
            "m": np.stack([s.m for s in states]).astype(np.float32, copy=False),
            "n": np.array([s.n for s in states], np.int64),
            "item": item_b,
            "category": cat_b,
            "mask": mask,
        }
        (logits,) = self._run_scorer(SCORER_OUTPUTS, feeds)
        return [logits[row, :size] for row, size in enumerate(sizes)]

    # ------------------------------------------------------------------ warm-up
    def warmup(
        self,
        candidate_counts: Iterable[int] = (1, 100, 500, 1000, 2000),
        build_sizes: Sequence[int] = (256, 4096),
        repeats: int = 3,
    ) -> Warmup:
        """Run every graph at representative sizes (first calls allocate) and measure
        them: the timings `CostModel.from_warmup` fits."""
        rng = np.random.default_rng(0)
        out = Warmup(chunk_events=self._chunk)
        for n in (0, *build_sizes):
            events = _synthetic_events(rng, n)
            self.build_state(events)
            out.build_ms[n] = _median_ms(lambda ev=events: self.build_state(ev), repeats)
        state = self.build_state(_synthetic_events(rng, 64))
        for m in candidate_counts:
            items = rng.integers(0, 1 << 40, size=int(m), dtype=np.int64)
            self.score(state, items)
            out.score_ms[int(m)] = _median_ms(lambda it=items: self.score(state, it), repeats)
        return out


def _synthetic_events(rng: np.random.Generator, n: int) -> np.ndarray:
    ev = np.zeros(n, EVENT_DTYPE)
    ev["item_id"] = rng.integers(0, 1 << 40, size=n)
    ev["category"] = -1
    ev["ts"] = 1_700_000_000 + np.arange(n, dtype=np.int64) * 60
    ev["action"] = rng.integers(0, 4, size=n)
    return ev


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


__all__ = ["ArtifactError", "ArtifactWrongModel", "ModelRuntime"]
