"""Dataset: padding with implicit negatives, history prefixes, bucketing, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ifa_common.hashing import category_bucket, item_bucket
from model_export.data.dataset import Dataset, build_dataset
from model_export.data.logs import LogData, load_log
from model_export.data.sampling import sample_negatives
from model_export.data.synthetic import generate, write_log
from model_export.model.config import ModelConfig

CFG = ModelConfig(item_buckets=1000, category_buckets=17, action_buckets=5)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> LogData:
    df = generate(10, 200, 800, 400, 12, requests_per_user=6, seed=1)
    return load_log(write_log(df, tmp_path_factory.mktemp("ds") / "s.parquet"))


def test_sets_padded_with_unexposed_negatives(log: LogData) -> None:
    ds = build_dataset(log, CFG, set_size=30, seed=0)
    seen = 0
    for split in ("train", "valid", "test"):
        for b in ds.batches(split):
            assert b.cand_item.shape[1] == 30  # synthetic sets have <= 25 logged rows
            assert bool(b.cand_mask.all())
            neg = ~b.exposed
            assert float(b.label[neg].sum()) == 0.0
            for r in range(b.num_requests):
                items = b.cand_item[r].tolist()
                assert len(set(items)) == len(items)  # no exposed item reused as a negative
            seen += b.num_requests
    assert seen == log.num_requests


def test_padding_matches_the_logged_rows(log: LogData) -> None:
    ds = build_dataset(log, CFG, set_size=30, seed=0)
    u = int(ds.users("test")[0])
    b = ds.user_batch(u, "test")
    r = int(
        log.req_offsets[u]
        + np.flatnonzero(log.req_split[log.req_offsets[u] : log.req_offsets[u + 1]] == 2)[0]
    )
    c = slice(log.cand_offsets[r], log.cand_offsets[r + 1])
    m = int(b.exposed[0].sum())
    assert b.cand_item[0, :m].tolist() == item_bucket(log.cand_item[c], 1000).tolist()
    assert b.cand_cat[0, :m].tolist() == category_bucket(log.cand_category[c], 17).tolist()
    assert b.label[0, :m].tolist() == log.cand_label[c].astype(float).tolist()


def test_eval_padding_fixed_train_padding_per_epoch(log: LogData) -> None:
    a = build_dataset(log, CFG, set_size=40, seed=0)
    b = build_dataset(log, CFG, set_size=40, seed=0)
    first = [x.cand_item for x in a.batches("test")]
    other = [x.cand_item for x in b.batches("test")]
    # another epoch, shuffled: the same sets per user (users keyed by their history)
    again = {
        (int(x.ev_ts[0]), x.num_events): x.cand_item
        for x in a.batches("test", shuffle=True, epoch=3)
    }
    for x, o in zip(a.batches("test"), other, strict=True):
        assert torch.equal(x.cand_item, o)
        assert torch.equal(x.cand_item, again[(int(x.ev_ts[0]), x.num_events)])
    assert len(first) == len(again)
    e0 = [x.cand_item for x in a.batches("train", epoch=0)]
    e0b = [x.cand_item for x in a.batches("train", epoch=0)]
    e1 = [x.cand_item for x in a.batches("train", epoch=1)]
    assert all(torch.equal(x, y) for x, y in zip(e0, e0b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(e0, e1, strict=True))


def test_req_prefix_and_history_are_strictly_before(log: LogData) -> None:
    ds = build_dataset(log, CFG, set_size=25, seed=0)
    for split in ("train", "test"):
        for u in ds.users(split):
            b = ds.user_batch(int(u), split)
            r0, r1 = log.req_offsets[u], log.req_offsets[u + 1]
            code = ("train", "valid", "test").index(split)
            req_ts = log.req_ts[r0:r1][log.req_split[r0:r1] == code]
            ts = b.ev_ts.numpy()
            assert (np.diff(b.req_prefix.numpy()) >= 0).all()
            for p, t in zip(b.req_prefix.tolist(), req_ts.tolist(), strict=True):
                assert (ts[:p] < t).all()
                # every behaviour before the request is there, whatever its split
                all_ts = log.ev_ts[log.ev_offsets[u] : log.ev_offsets[u + 1]]
                assert p == int((all_ts < t).sum())
            assert b.num_events == int(b.req_prefix.max())  # trimmed after the last use


def test_bucketing(log: LogData) -> None:
    ds = build_dataset(log, CFG, set_size=25, seed=0)
    u = int(ds.users("train")[0])
    b = ds.user_batch(u, "train")
    e = slice(log.ev_offsets[u], log.ev_offsets[u] + b.num_events)
    assert b.ev_item.tolist() == (log.ev_item[e] % 1000).tolist()
    assert b.ev_cat.tolist() == (1 + log.ev_category[e] % 16).tolist()
    assert b.ev_action.tolist() == (1 + log.ev_action[e] % 4).tolist()
    assert int(b.cand_cat.min()) >= 1  # row 0 (unknown) never used for real candidates


def test_large_sets_truncated_in_training_kept_in_eval(tmp_path: Path) -> None:
    rows = ["user_id,item_id,category,ts,label,request_id"]
    rows += [f"u,{i},{i % 3},{10 + i},1," for i in range(5)]
    for q, t in (("a", 100), ("b", 200), ("c", 300)):
        rows += [f"u,{100 + i},{i % 3},{t},{int(i < 2)},{q}" for i in range(12 if q != "a" else 4)]
    rows += [f"v,{i},0,5,1," for i in range(300, 310)]
    path = tmp_path / "l.csv"
    path.write_text("\n".join(rows) + "\n")
    log = load_log(path)
    ds = build_dataset(log, CFG, set_size=8, seed=0)
    train = ds.user_batch(0, "train")  # request a: 4 logged + 4 negatives
    assert train.cand_item.shape == (1, 8) and int(train.exposed.sum()) == 4
    test = ds.user_batch(0, "test")  # request c: all 12 logged rows kept
    assert test.cand_item.shape == (1, 12) and int(test.exposed.sum()) == 12
    valid = ds.user_batch(0, "valid", fixed_padding=False)  # training mode truncates
    assert valid.cand_item.shape == (1, 8) and int(valid.exposed.sum()) == 8


def test_sample_negatives_small_pool_and_exclusion() -> None:
    rng = np.random.default_rng(0)
    pool = np.arange(10, dtype=np.int64)
    got = sample_negatives(rng, pool, np.array([1, 2, 3]), 20)
    assert sorted(got.tolist()) == [0, 4, 5, 6, 7, 8, 9]
    big = np.arange(0, 100_000, 7, dtype=np.int64)
    got = sample_negatives(rng, big, big[:50], 200)
    assert got.size == 200 and np.unique(got).size == 200
    assert not np.isin(got, big[:50]).any()


def test_item_table_stats_and_data_id(log: LogData) -> None:
    ds: Dataset = build_dataset(log, CFG, set_size=25, seed=0)
    items, cats = ds.item_table()
    assert (np.diff(items) > 0).all() and items.size == cats.size
    s = ds.stats()
    assert s["users"] == 10 and s["requests"]["train"] + s["requests"]["test"] > 0
    assert s["max_n"] >= s["mean_n"] > 0
    assert ds.data_id == build_dataset(log, CFG, set_size=25, seed=0).data_id
    assert ds.data_id != build_dataset(log, CFG, set_size=26, seed=0).data_id
    small = build_dataset(log, CFG, set_size=25, seed=0, max_users=3)
    assert small.num_users("train") == 3 and set(small.users("test")) <= {0, 1, 2}
