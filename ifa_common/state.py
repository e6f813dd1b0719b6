"""The per-user linear-attention state (S, z) and the one `fold` used everywhere.

A state summarises a set of events for every head h:

    S_h = sum_i w_ih * phi(k_ih) v_ihᵀ     (F x D)
    z_h = sum_i w_ih * phi(k_ih)           (F,)

stored *relative* to a per-head log-scale m_h and a reference time t_ref (the latest
event time covered): the true sums are exp(m_h) * S_h. w_ih = exp(-lambda_h (t_ref - t_i))
for decay heads, 1 otherwise; exponential feature maps put their own shift in m_h too.
Readouts are ratios S/z, so the common factor exp(m_h) cancels; keeping it out of the
floats is what keeps the state finite in float32 for 100,000-event histories and for
any time gap. State(A ∪ B) = fold(state(A), state(B)), exactly, in any order.
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

EMPTY_LOG_SCALE: Final = -1.0e30  # log-scale of a state with no events (finite: no NaN in folds)
STATE_FORMAT_VERSION: Final = 1
_MAGIC: Final = b"IFAS"
_HEAD: Final = struct.Struct("<4sHHHHH")  # magic, format, H, F, D, len(model_version)
_COUNTS: Final = struct.Struct("<qq")  # n events covered, t_ref


class StateFormatError(ValueError):
    """Bytes that are not a state of this format and these dims."""


class StateVersionMismatch(StateFormatError):
    """A state serialised for another model version: it must never be applied."""


@dataclass(frozen=True, slots=True)
class UserState:
    S: np.ndarray  # (H, F, D) float32
    z: np.ndarray  # (H, F) float32
    m: np.ndarray  # (H,) float32, log-scale
    t_ref: int  # unix seconds of the latest event covered (0 when empty)
    n: int  # events covered

    @classmethod
    def empty(cls, heads: int, d_phi: int, d_head: int) -> UserState:
        return cls(
            S=np.zeros((heads, d_phi, d_head), np.float32),
            z=np.zeros((heads, d_phi), np.float32),
            m=np.full((heads,), EMPTY_LOG_SCALE, np.float32),
            t_ref=0,
            n=0,
        )

    @property
    def dims(self) -> tuple[int, int, int]:
        h, f, d = self.S.shape
        return int(h), int(f), int(d)

    @property
    def nbytes(self) -> int:
        return int(self.S.nbytes + self.z.nbytes + self.m.nbytes + 16)


def _xp(x: Any) -> Any:
    # numpy for arrays, torch for tensors; torch is imported only when a tensor is passed.
    return np if isinstance(x, np.ndarray) else importlib.import_module("torch")


def fold_arrays(
    S_a: Any,
    z_a: Any,
    m_a: Any,
    t_a: Any,
    S_b: Any,
    z_b: Any,
    m_b: Any,
    t_b: Any,
    decay: Any,
) -> tuple[Any, Any, Any, Any]:
    """Fold two states; numpy arrays or torch tensors, with any leading batch dims.

    S (..., H, F, D), z (..., H, F), m (..., H), t (...) int64, decay (H,) per second.
    Returns (S, z, m, t). The same arithmetic serves training (torch, differentiable),
    export tests and serving (numpy).
    """
    xp = _xp(S_a)
    t = xp.where(t_a > t_b, t_a, t_b)  # (...)
    # int64 difference first: unix seconds do not fit float32's 24-bit mantissa.
    gap_a = (t - t_a)[..., None] * decay  # (..., H)
    gap_b = (t - t_b)[..., None] * decay  # (..., H)
    la = m_a - gap_a
    lb = m_b - gap_b
    m = xp.maximum(la, lb)  # (..., H)
    ca = xp.exp(la - m)
    cb = xp.exp(lb - m)
    S = ca[..., None, None] * S_a + cb[..., None, None] * S_b
    z = ca[..., None] * z_a + cb[..., None] * z_b
    if xp is np:
        return S.astype(np.float32), z.astype(np.float32), m.astype(np.float32), t
    return S, z, m.to(S_a.dtype), t


def fold(a: UserState, b: UserState, decay: np.ndarray) -> UserState:
    """state(A ∪ B) from state(A) and state(B). `decay` (H,) is in 1/seconds."""
    lam = np.asarray(decay, dtype=np.float64)
    S, z, m, t = fold_arrays(
        a.S,
        a.z,
        a.m.astype(np.float64),
        np.int64(a.t_ref),
        b.S,
        b.z,
        b.m.astype(np.float64),
        np.int64(b.t_ref),
        lam,
    )
    return UserState(S=S, z=z, m=m, t_ref=int(t), n=a.n + b.n)


def serialize(state: UserState, model_version: str) -> bytes:
    """Fixed layout: header, counts, m, z, S (float32, little endian)."""
    h, f, d = state.dims
    tag = model_version.encode()
    return b"".join(
        (
            _HEAD.pack(_MAGIC, STATE_FORMAT_VERSION, h, f, d, len(tag)),
            tag,
            _COUNTS.pack(state.n, state.t_ref),
            np.ascontiguousarray(state.m, "<f4").tobytes(),
            np.ascontiguousarray(state.z, "<f4").tobytes(),
            np.ascontiguousarray(state.S, "<f4").tobytes(),
        )
    )


def covered_events(buf: bytes) -> int | None:
    """The number of events a serialised state covers, from its header alone (None: not
    a state of this format). Lets storage check a state against its sequence unparsed."""
    if len(buf) < _HEAD.size:
        return None
    magic, fmt, _, _, _, tag_len = _HEAD.unpack_from(buf, 0)
    if (
        magic != _MAGIC
        or fmt != STATE_FORMAT_VERSION
        or len(buf) < _HEAD.size + tag_len + _COUNTS.size
    ):
        return None
    n: int = _COUNTS.unpack_from(buf, _HEAD.size + tag_len)[0]
    return n


def deserialize(buf: bytes, model_version: str, dims: tuple[int, int, int]) -> UserState:
    """Inverse of `serialize`; refuses another format, model version or dims."""
    if len(buf) < _HEAD.size:
        raise StateFormatError("state too short")
    magic, fmt, h, f, d, tag_len = _HEAD.unpack_from(buf, 0)
    if magic != _MAGIC or fmt != STATE_FORMAT_VERSION:
        raise StateFormatError(f"not an IFA state of format {STATE_FORMAT_VERSION}")
    off = _HEAD.size
    tag = bytes(buf[off : off + tag_len]).decode(errors="replace")
    if tag != model_version:
        raise StateVersionMismatch(f"state built by model {tag!r}, runtime is {model_version!r}")
    if (h, f, d) != tuple(dims):
        raise StateFormatError(f"state dims {(h, f, d)} != model dims {tuple(dims)}")
    off += tag_len
    expected = off + _COUNTS.size + 4 * (h + h * f + h * f * d)
    if len(buf) != expected:
        raise StateFormatError(f"state is {len(buf)} bytes, expected {expected}")
    n, t_ref = _COUNTS.unpack_from(buf, off)
    off += _COUNTS.size
    m = np.frombuffer(buf, "<f4", h, off).copy()
    off += 4 * h
    z = np.frombuffer(buf, "<f4", h * f, off).reshape(h, f).copy()
    off += 4 * h * f
    S = np.frombuffer(buf, "<f4", h * f * d, off).reshape(h, f, d).copy()
    # A blob read from Redis is input, not trusted: one with NaN/inf or a negative count
    # would poison every later fold and score of this user.
    if n < 0 or t_ref < 0:
        raise StateFormatError(f"state counts out of range (n={n}, t_ref={t_ref})")
    if not (np.isfinite(S).all() and np.isfinite(z).all() and np.isfinite(m).all()):
        raise StateFormatError("state holds non-finite values")
    return UserState(S=S, z=z, m=m, t_ref=int(t_ref), n=int(n))
