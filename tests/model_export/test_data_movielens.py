"""MovieLens conversion on a hand-made file set in RecBole's atomic format (no download)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from model_export.data.logs import load_log
from model_export.data.movielens import DataUnavailable, prepare, timestamp_blocks

ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tGoldenEye\t1995\tAction Adventure Thriller\n"
    "3\tFour Rooms\t1995\tThriller\n"
)
USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n1\t24\tM\tx\t1\n"


def fake_raw(root: Path) -> Path:
    raw = root / "ml-100k"
    raw.mkdir(parents=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    # user 7: 25 ratings at one timestamp, 2 later, then 15 at a third; user 8: two ratings
    lines += [f"7\t{1 + i % 3}\t{1 + i % 5}\t1000" for i in range(25)]
    lines += ["7\t1\t5\t2000", "7\t2\t4\t2000"]
    lines += [f"7\t{1 + i % 3}\t{1 + i % 5}\t3000" for i in range(15)]
    lines += ["8\t2\t5\t10", "8\t3\t1\t5"]
    (raw / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    (raw / "ml-100k.item").write_text(ITEM)
    (raw / "ml-100k.user").write_text(USER)
    return raw


def test_timestamp_blocks_keep_equal_times_together() -> None:
    ts = np.array([1] * 5 + [2] * 10 + [3] * 8 + [4] * 45)
    b = timestamp_blocks(ts, block=20)
    assert b[:15].tolist() == [0] * 15  # 5 + 10 fit
    assert b[15:23].tolist() == [1] * 8  # 8 more would make 23: new block
    assert np.bincount(b[23:]).tolist()[2:] == [20, 20, 5]  # a 45-run is cut in 20s
    assert (np.diff(b) >= 0).all()


def test_convert_fake_files(tmp_path: Path) -> None:
    fake_raw(tmp_path)
    out = prepare(tmp_path)  # files present: no download
    assert out == tmp_path / "ml-100k" / "ml100k.parquet"
    log = load_log(out)
    assert log.num_rows == 44 and list(log.user_ids) == ["7", "8"]
    # genres in sorted order: Action 0, Animation 1, Thriller 2
    assert dict(zip(log.item_ids.tolist(), log.item_category.tolist(), strict=True)) == {
        1: 1,
        2: 0,
        3: 2,
    }
    # user 7: the 25-rating run is cut 20 + 5, the two at ts 2000 join the 5, and the
    # 15 at ts 3000 do not fit (7 + 15 > 20): a block of their own
    r7 = slice(log.req_offsets[0], log.req_offsets[1])
    assert np.diff(log.cand_offsets)[r7].tolist() == [20, 7, 15]
    assert log.req_ts[r7].tolist() == [1000, 1000, 3000]
    # the second block's history: nothing strictly before 1000; the third sees all positives
    assert log.req_prefix[r7].tolist() == [0, 0, int((log.ev_ts[: log.ev_offsets[1]] < 3000).sum())]
    assert log.cand_label.sum() == log.num_events  # every positive is a rating row
    # user 8: ratings sorted by time go in one block
    assert log.req_ts[log.req_offsets[1]] == 5
    # idempotent: a second call reuses the converted file
    mtime = out.stat().st_mtime_ns
    assert prepare(tmp_path) == out and out.stat().st_mtime_ns == mtime
    assert (tmp_path / "ml-100k" / "items.parquet").is_file()


def test_download_failure_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*a: object, **k: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(subprocess, "run", offline)  # the module calls subprocess.run
    with pytest.raises(DataUnavailable, match=r"could not download recbole==1\.2\.1") as err:
        prepare(tmp_path)
    assert "\n" not in str(err.value)


def test_cli_movielens_uses_prepared_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ifa_rank.cli import main

    fake_raw(tmp_path)
    assert main(["data", "movielens", "--dir", str(tmp_path)]) == 0
    assert "2 users, 3 items, 44 ratings" in capsys.readouterr().out
