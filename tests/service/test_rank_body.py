"""`parse_rank_body`: the /rank body with its id bounds checked on the int64 array must
accept exactly what `RankRequest` accepts, with the same values, and refuse the rest with
`RankRequest`'s own errors."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.http.middleware import parse_body
from service.http.protocol import ID_MAX, RankRequest
from service.http.rank_body import parse_rank_body

ids = st.one_of(
    st.integers(0, ID_MAX),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, ID_MAX, ID_MAX + 1, -(2**63), -(2**63) - 1, 2**64]),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
    st.none(),
)
bodies = st.fixed_dictionaries(
    {"user_id": st.one_of(st.just("u1"), st.just("u1"), st.text(max_size=5), st.integers())},
    optional={
        "candidates": st.one_of(
            st.lists(st.integers(-(2**64), 2**64), min_size=1, max_size=6),
            st.lists(st.integers(-3, ID_MAX), min_size=1, max_size=6),
            st.lists(ids, max_size=6),
            ids,
        ),
        "top_k": st.one_of(st.integers(-2, 5), st.none(), st.just("3")),
        "budget_ms": st.one_of(st.floats(-1, 100), st.none()),
        "request_id": st.one_of(st.just("r-1"), st.text(max_size=3)),
        "extra": st.integers(),
    },
)


def _reference(raw: bytes) -> tuple[RankRequest | None, list[dict[str, Any]] | None]:
    try:
        return parse_body(RankRequest, raw), None
    except RequestValidationError as e:
        return None, list(e.errors())


def _check(raw: bytes) -> None:
    want, want_errors = _reference(raw)
    if want_errors is not None:
        with pytest.raises(RequestValidationError) as e:
            parse_rank_body(raw)
        assert list(e.value.errors()) == want_errors
        return
    assert want is not None
    got, items = parse_rank_body(raw)
    assert got.model_dump() == want.model_dump()
    assert items.dtype == np.int64 and items.tolist() == want.candidates


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_it_agrees_with_the_documented_model(body: dict[str, Any]) -> None:
    _check(json.dumps(body).encode())


@pytest.mark.parametrize(
    "candidates",
    [
        [0, 1, ID_MAX],
        [-1],
        [3, -(2**63)],
        [ID_MAX + 1],
        [1, 2**64, -5],  # two bad ids: both named, as RankRequest names them
        [True, 1],
        [1.0],
    ],
)
def test_ids_at_and_past_their_bounds(candidates: list[Any]) -> None:
    _check(json.dumps({"user_id": "u1", "candidates": candidates}).encode())


def test_a_bad_id_beside_another_bad_field_names_both() -> None:
    raw = json.dumps({"user_id": "a b", "candidates": [1, -1]}).encode()
    with pytest.raises(RequestValidationError) as e:
        parse_rank_body(raw)
    assert [err["loc"] for err in e.value.errors()] == [
        ("body", "user_id"),
        ("body", "candidates", 1),
    ]


def test_not_json_is_refused_as_the_model_refuses_it() -> None:
    for raw in (b"", b"{", b"[1, 2]", b'{"user_id": "u1", "candidates": [1,]}'):
        _check(raw)
