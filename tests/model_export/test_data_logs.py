"""The generic log loader: semantics on good files, refusal of malformed ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model_export.data.logs import LogFormatError, default_splits, load_log

GOOD = """user_id,item_id,category,ts,action,label,request_id
a,1,10,100,0,1,
a,2,10,200,2,1,
a,3,11,200,0,0,r1
a,4,11,205,0,1,r1
b,5,12,50,0,1,
a,6,10,150,1,1,
a,7,12,300,0,1,r2
a,8,12,300,0,0,r2
a,9,13,300,0,1,
b,5,12,60,0,0,
"""


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check_good(log_path: Path) -> None:
    log = load_log(log_path)
    assert list(log.user_ids) == ["a", "b"]
    assert log.ignored_rows == 1  # b's label-0 row without request
    # a's behaviours by (ts, file row): 1@100, 6@150, 2@200, 4@205, 7@300, 9@300
    a = slice(log.ev_offsets[0], log.ev_offsets[1])
    assert log.ev_item[a].tolist() == [1, 6, 2, 4, 7, 9]
    assert log.ev_action[a].tolist() == [0, 1, 2, 0, 0, 0]
    assert log.ev_item[log.ev_offsets[1] : log.ev_offsets[2]].tolist() == [5]
    # requests: r1 at min ts 200 sees 1, 6 (item 2 at ts 200 is not strictly before)
    assert log.req_id.tolist() == ["r1", "r2"]
    assert log.req_ts.tolist() == [200, 300]
    assert log.req_prefix.tolist() == [2, 4]
    assert log.cand_item.tolist() == [3, 4, 7, 8]
    assert log.cand_label.tolist() == [0, 1, 1, 0]
    assert log.cand_offsets.tolist() == [0, 2, 4]
    # two requests: train + test
    assert log.req_split.tolist() == [0, 2]
    assert log.item_ids.tolist() == list(range(1, 10))


def test_good_csv(tmp_path: Path) -> None:
    check_good(write(tmp_path, GOOD))


def test_good_parquet_same_as_csv(tmp_path: Path) -> None:
    csv = write(tmp_path, GOOD)
    df = pd.read_csv(csv, dtype={"user_id": str, "request_id": str})
    pq = tmp_path / "log.parquet"
    df.to_parquet(pq, index=False)
    check_good(pq)


def test_action_optional_and_tie_order_is_file_order(tmp_path: Path) -> None:
    text = (
        "user_id,item_id,category,ts,label,request_id\n"
        "u,30,1,10,1,\n"
        "u,10,1,10,1,\n"
        "u,20,1,10,1,\n"
        "u,99,1,11,0,q\n"
    )
    log = load_log(write(tmp_path, text))
    assert log.ev_item.tolist() == [30, 10, 20]
    assert log.ev_action.tolist() == [0, 0, 0]
    assert log.req_prefix.tolist() == [3]


def test_split_derivation_counts() -> None:
    for r, expect in [(1, [1, 0, 0]), (2, [1, 0, 1]), (3, [1, 1, 1]), (10, [8, 1, 1]),
                      (14, [12, 1, 1]), (15, [11, 2, 2]), (20, [16, 2, 2])]:  # fmt: skip
        codes = default_splits(np.arange(r), np.full(r, r))
        assert np.bincount(codes, minlength=3).tolist() == expect, r
        assert (np.diff(codes) >= 0).all()  # test is the latest, valid just before


def test_split_derived_per_user_in_time_order(tmp_path: Path) -> None:
    rows = ["user_id,item_id,category,ts,label,request_id"]
    # requests written in reverse time order: the split must follow time, not the file
    for j in reversed(range(5)):
        rows.append(f"x,{j},0,{1000 + j},1,x{j}")
    log = load_log(write(tmp_path, "\n".join(rows) + "\n"))
    assert log.req_id.tolist() == [f"x{j}" for j in range(5)]
    assert log.req_split.tolist() == [0, 0, 0, 1, 2]
    assert log.req_prefix.tolist() == [0, 1, 2, 3, 4]  # earlier clicks are history


def test_explicit_split_column(tmp_path: Path) -> None:
    text = (
        "user_id,item_id,category,ts,label,request_id,split\n"
        "u,1,0,10,1,,\n"
        "u,2,0,20,1,q1,test\n"
        "u,3,0,30,0,q2,train\n"
    )
    log = load_log(write(tmp_path, text))
    assert log.req_split.tolist() == [2, 0]


BASE = "user_id,item_id,category,ts,action,label,request_id\n"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("user_id,item_id,category,ts,label\nu,1,2,3,1\n", ["request_id", "missing"]),
        ("", ["empty"]),
        (BASE, ["empty"]),
        (BASE + "u,1,2,3,0,1,q\nu,abc,2,3,0,1,q\n", ["item_id", "row 2", "abc"]),
        (BASE + "u,1,2,3,0,1,q\nu,1.5,2,3,0,1,q\n", ["item_id", "row 2"]),
        (BASE + "u,1,2,3,0,1,q\nu,-4,2,3,0,1,q\n", ["item_id", "row 2", "negative"]),
        (BASE + "u,1,2,-3,0,1,q\n", ["'ts'", "row 1", "negative"]),
        (BASE + "u,1,2,3,0,1,q\nu,1,2,,0,1,q\n", ["'ts'", "row 2", "missing"]),
        (BASE + "u,1,2,3,0,1,q\nu,1,2,yesterday,0,1,q\n", ["'ts'", "row 2"]),
        (BASE + "u,1,2,3,0,2,q\n", ["label", "row 1", "0 or 1"]),
        (BASE + "u,1,x,3,0,1,q\n", ["category", "row 1"]),
        (BASE + "u,1,2,3,0,1,q\n,1,2,3,0,1,q\n", ["user_id", "row 2", "missing"]),
        (
            BASE + "u,1,2,3,0,1,q\nv,1,2,3,0,1,p\nv,1,2,4,0,1,q\n",
            ["request_id", "row 3", "two users"],
        ),
        (BASE + "u,1,2,3,0,1,\n", ["request_id", "no requests"]),
        (BASE + "u,1,2,3,0,1,q\nu,1,2,99999999999999999999,0,1,q\n", ["'ts'", "row 2"]),
    ],
)
def test_malformed_csv_is_refused(tmp_path: Path, text: str, needles: list[str]) -> None:
    with pytest.raises(LogFormatError) as err:
        load_log(write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_inconsistent_split_is_refused(tmp_path: Path) -> None:
    text = (
        "user_id,item_id,category,ts,label,request_id,split\n"
        "u,1,0,10,1,q,train\n"
        "u,2,0,10,0,q,test\n"
    )
    with pytest.raises(LogFormatError, match=r"'split', row 2"):
        load_log(write(tmp_path, text))
    bad = text.replace("test", "holdout")
    with pytest.raises(LogFormatError, match=r"'split', row 2: 'holdout'"):
        load_log(write(tmp_path, bad))


def test_parquet_wrong_type_is_refused(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "user_id": ["u", "u"],
            "item_id": [1, 2],
            "category": [0, 0],
            "ts": [1.0, 2.5],  # float timestamps with a fraction
            "label": [1, 0],
            "request_id": ["q", "q"],
        }
    )
    path = tmp_path / "bad.parquet"
    df.to_parquet(path, index=False)
    with pytest.raises(LogFormatError, match=r"'ts', row 2"):
        load_log(path)
    df["ts"] = [1, 2]
    df["user_id"] = [1.5, 2.5]  # not strings
    df.to_parquet(path, index=False)
    with pytest.raises(LogFormatError, match=r"'user_id', row 1"):
        load_log(path)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError, match="extension"):
        load_log(write(tmp_path, GOOD, "log.json"))
    with pytest.raises(FileNotFoundError):
        load_log(tmp_path / "nope.csv")


def test_large_log_loads_fast(tmp_path: Path) -> None:
    """200k rows: vectorised loading, no per-row Python (a loose bound for a shared box)."""

    rng = np.random.default_rng(0)
    n = 200_000
    users = rng.integers(0, 50, n)
    req = np.where(rng.random(n) < 0.1, rng.integers(0, 2000, n), -1)
    df = pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": rng.integers(0, 10_000, n),
            "category": rng.integers(0, 50, n),
            "ts": np.sort(rng.integers(0, 10**9, n)),
            "label": rng.integers(0, 2, n),
            # requests are per user, so their id carries the user
            "request_id": [f"u{u}-{r}" if r >= 0 else "" for u, r in zip(users, req, strict=True)],
        }
    )
    path = tmp_path / "big.parquet"
    df.to_parquet(path, index=False)
    log = load_log(path)
    assert log.num_rows == n
    # spot-check req_prefix against a brute-force count for one request
    r = log.num_requests // 2
    u = int(np.searchsorted(log.req_offsets, r, side="right") - 1)
    ev_ts = log.ev_ts[log.ev_offsets[u] : log.ev_offsets[u + 1]]
    assert log.req_prefix[r] == int((ev_ts < log.req_ts[r]).sum())
