"""Properties of the user state every side shares: fold is exact, commutative, associative
and has the empty state as identity; serialisation round-trips and refuses what it must.
Seeded random cases, no clocks."""

from __future__ import annotations

import numpy as np
import pytest

from ifa_common.state import (
    StateFormatError,
    StateVersionMismatch,
    UserState,
    deserialize,
    fold,
    serialize,
)

H, F, D = 3, 5, 4
DECAY = np.array([0.0, 1e-5, 3e-4])  # per second: a lifelong head and two decaying ones


def random_state(rng: np.random.Generator) -> UserState:
    return UserState(
        S=rng.random((H, F, D), dtype=np.float32),
        z=rng.random((H, F), dtype=np.float32) + 0.1,
        m=rng.normal(0, 5, H).astype(np.float32),
        t_ref=int(rng.integers(1_700_000_000, 1_700_100_000)),
        n=int(rng.integers(1, 1000)),
    )


def true_sums(s: UserState, at: int) -> tuple[np.ndarray, np.ndarray]:
    """exp(m - lambda (at - t_ref)) * (S, z) in float64: the sums the state stands for."""
    scale = np.exp(s.m.astype(np.float64) - DECAY * (at - s.t_ref))  # (H,)
    return scale[:, None, None] * s.S, scale[:, None] * s.z


def assert_same(a: UserState, b: UserState) -> None:
    at = max(a.t_ref, b.t_ref)
    for x, y in zip(true_sums(a, at), true_sums(b, at), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5)
    assert (a.n, a.t_ref) == (b.n, b.t_ref)


@pytest.mark.parametrize("seed", range(20))
def test_fold_is_commutative_and_associative(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b, c = random_state(rng), random_state(rng), random_state(rng)
    assert_same(fold(a, b, DECAY), fold(b, a, DECAY))
    assert_same(fold(fold(a, b, DECAY), c, DECAY), fold(a, fold(b, c, DECAY), DECAY))


@pytest.mark.parametrize("seed", range(10))
def test_fold_adds_the_true_sums(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = random_state(rng), random_state(rng)
    out = fold(a, b, DECAY)
    at = out.t_ref
    want_S = true_sums(a, at)[0] + true_sums(b, at)[0]
    want_z = true_sums(a, at)[1] + true_sums(b, at)[1]
    np.testing.assert_allclose(true_sums(out, at)[0], want_S, rtol=1e-5)
    np.testing.assert_allclose(true_sums(out, at)[1], want_z, rtol=1e-5)
    assert out.n == a.n + b.n and out.t_ref == max(a.t_ref, b.t_ref)


def test_empty_state_is_the_identity() -> None:
    a = random_state(np.random.default_rng(0))
    empty = UserState.empty(H, F, D)
    for out in (fold(empty, a, DECAY), fold(a, empty, DECAY)):
        assert_same(out, a)
        assert np.isfinite(out.S).all() and np.isfinite(out.m).all()


def test_folded_state_stays_finite_over_long_gaps() -> None:
    rng = np.random.default_rng(1)
    a, b = random_state(rng), random_state(rng)
    later = UserState(S=b.S, z=b.z, m=b.m, t_ref=a.t_ref + 10 * 365 * 86_400, n=b.n)
    out = fold(a, later, DECAY)  # ten years later
    assert np.isfinite(out.S).all() and np.isfinite(out.z).all() and np.isfinite(out.m).all()


@pytest.mark.parametrize("seed", range(5))
def test_serialize_round_trips_exactly(seed: int) -> None:
    s = random_state(np.random.default_rng(seed))
    back = deserialize(serialize(s, "v1"), "v1", (H, F, D))
    assert back.n == s.n and back.t_ref == s.t_ref
    for x, y in ((back.S, s.S), (back.z, s.z), (back.m, s.m)):
        assert np.array_equal(x, y)


def test_deserialize_refuses_another_model_dims_or_a_damaged_buffer() -> None:
    buf = serialize(random_state(np.random.default_rng(0)), "v1")
    with pytest.raises(StateVersionMismatch):
        deserialize(buf, "v2", (H, F, D))
    with pytest.raises(StateFormatError, match="dims"):
        deserialize(buf, "v1", (H, F + 1, D))
    with pytest.raises(StateFormatError, match="bytes"):
        deserialize(buf[:-4], "v1", (H, F, D))
    with pytest.raises(StateFormatError):
        deserialize(b"XXXX" + buf[4:], "v1", (H, F, D))
    with pytest.raises(StateFormatError, match="short"):
        deserialize(b"IF", "v1", (H, F, D))


def test_deserialize_refuses_non_finite_values_and_negative_counts() -> None:
    s = random_state(np.random.default_rng(1))
    nan = UserState(S=s.S.copy(), z=s.z, m=s.m, t_ref=s.t_ref, n=s.n)
    nan.S[0, 0, 0] = np.nan
    with pytest.raises(StateFormatError, match="non-finite"):
        deserialize(serialize(nan, "v1"), "v1", (H, F, D))
    inf = UserState(S=s.S, z=s.z, m=np.full_like(s.m, np.inf), t_ref=s.t_ref, n=s.n)
    with pytest.raises(StateFormatError, match="non-finite"):
        deserialize(serialize(inf, "v1"), "v1", (H, F, D))
    negative = UserState(S=s.S, z=s.z, m=s.m, t_ref=s.t_ref, n=-5)
    with pytest.raises(StateFormatError, match="out of range"):
        deserialize(serialize(negative, "v1"), "v1", (H, F, D))
