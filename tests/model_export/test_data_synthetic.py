"""The lifelong generator: deterministic, within bounds, and labels that need the whole history."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model_export.data.logs import LogData, load_log
from model_export.data.synthetic import generate, write_log

ARGS = {"users": 12, "min_len": 300, "max_len": 3000, "items": 2000, "categories": 40}


def small(seed: int = 0, **kw: int) -> pd.DataFrame:
    return generate(**{**ARGS, **kw}, requests_per_user=5, seed=seed)  # type: ignore[arg-type]


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    order = np.argsort(score, kind="mergesort")
    _, inv, cnt = np.unique(score[order], return_inverse=True, return_counts=True)
    ranks = np.empty(score.size)
    ranks[order] = (np.cumsum(cnt) - (cnt - 1) / 2.0)[inv]
    pos = label == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def count_features(log: LogData, window: int = 100) -> tuple[np.ndarray, ...]:
    """Per logged candidate: log count of its category in the whole history / last `window`."""
    whole, last, labels = [], [], []
    for u in range(log.num_users):
        cats = log.ev_category[log.ev_offsets[u] : log.ev_offsets[u + 1]]
        for r in range(log.req_offsets[u], log.req_offsets[u + 1]):
            p = int(log.req_prefix[r])
            c = log.cand_category[log.cand_offsets[r] : log.cand_offsets[r + 1]]
            whole.append(np.log1p((cats[:p, None] == c[None]).sum(0)))
            last.append(np.log1p((cats[max(0, p - window) : p, None] == c[None]).sum(0)))
            labels.append(log.cand_label[log.cand_offsets[r] : log.cand_offsets[r + 1]])
    return np.concatenate(whole), np.concatenate(last), np.concatenate(labels)


def test_deterministic_for_a_seed() -> None:
    a, b, c = small(0), small(0), small(1)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_user_rows_do_not_depend_on_user_count() -> None:
    a = small(0, users=3)
    b = small(0, users=5)
    ua = a[a.user_id == "u0"].reset_index(drop=True)
    ub = b[b.user_id == "u0"].reset_index(drop=True)
    pd.testing.assert_frame_equal(ua, ub)


def test_lengths_format_and_time_order(tmp_path: Path) -> None:
    df = small(3)
    hist = df[df.request_id == ""]
    n = hist.groupby("user_id").size()
    assert n.min() >= ARGS["min_len"] and n.max() <= ARGS["max_len"]
    assert (hist.label == 1).all()
    assert df.groupby("user_id").ts.apply(lambda s: s.is_monotonic_increasing).all()
    req = df[df.request_id != ""]
    per_req = req.groupby("request_id")
    assert per_req.user_id.nunique().max() == 1
    assert per_req.ts.nunique().max() == 1
    assert per_req.size().min() >= 10 and per_req.size().max() <= 25  # 15-25 draws, deduped
    assert (per_req.item_id.nunique() == per_req.size()).all()  # distinct candidates
    assert 0.1 < req.label.mean() < 0.5
    # requests sit in the last 30% of each user's history
    for uid, g in df.groupby("user_id"):
        h = g[g.request_id == ""].ts.to_numpy()
        t_req = g[g.request_id != ""].ts.min()
        assert (h < t_req).sum() >= int(0.7 * h.size), uid
    # round trip through the loader, both formats
    for name in ("s.parquet", "s.csv"):
        log = load_log(write_log(df, tmp_path / name))
        assert log.num_users == 12 and log.num_requests == 12 * 5
        assert log.num_events == int((df.label == 1).sum())


def test_log_uniform_lengths() -> None:
    df = generate(400, 100, 10_000, 500, 20, requests_per_user=1, seed=0)
    n = df[df.request_id == ""].groupby("user_id").size().to_numpy()
    # log-uniform over two decades: about a quarter of users per half decade
    frac_low = float((n < 1000).mean())
    assert 0.4 < frac_low < 0.6, frac_low


def test_labels_need_more_than_the_last_100_events(tmp_path: Path) -> None:
    df = generate(60, 2000, 6000, 5000, 60, requests_per_user=6, seed=7)
    log = load_log(write_log(df, tmp_path / "s.parquet"))
    whole, last, y = count_features(log)
    a_whole, a_last = auc(whole, y), auc(last, y)
    assert a_whole > a_last + 0.05, (a_whole, a_last)
    # within candidates whose category is absent from the last 100 events, the lifelong
    # count still separates clicks: information a last-100 model cannot have
    unseen = last == 0
    assert auc(whole[unseen], y[unseen]) > 0.65


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_len <= max_len"):
        generate(2, 100, 50, 100, 20, 2, 0)
    with pytest.raises(ValueError, match="categories >= 10"):
        generate(2, 10, 50, 100, 5, 2, 0)


def test_cli_writes_a_loadable_file(tmp_path: Path) -> None:
    from ifa_rank.cli import main

    out = tmp_path / "syn" / "x.csv"
    argv = ["data", "synthetic", "--users", "3", "--min-len", "200", "--max-len", "400"]
    assert main([*argv, "--items", "300", "--categories", "20", "--out", str(out)]) == 0
    assert load_log(out).num_users == 3
    assert main([*argv, "--out", str(tmp_path / "x.json")]) == 2
