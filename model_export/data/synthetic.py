"""Lifelong synthetic users whose click labels depend on the whole history.

The full rule is in docs/synthetic.md; in short:

* World: items belong to Zipf-popular categories and carry a quality q ~ N(0, 1).
* A user's N events (log-uniform in [min_len, max_len]) mix background browsing with
  the user's own interests: ancient interests (half the events of an early period, then
  almost gone), a mid-life interest period, rare-but-steady interests (~0.4% of events
  each, all the time) and a recent drift category (half of the last few % of events).
  Interest events carry stronger actions (like, share) than background views.
* Requests sit in the last 30% of the timeline with ~20 logged candidates drawn from the
  user's lifelong interest categories, recent categories, and popular ones.
* Label rule, on the history strictly before the request (weight of a behaviour =
  1 + action):

      lifelong(c) = log(1 + w_c) / log(1 + W)   w_c: weight of category c, W: all weight
      recent(c)   = weight share of c in the last 100 behaviours
      p(click)    = sigmoid(6 lifelong(c) + 3 recent(c) + 0.7 q(item) - 4.5)

  Clicked candidates become behaviours (label-1 rows of the request) and so feed later
  requests. The rule reads the history, not any model's form; a model that sees only the
  last 100 events cannot tell an ancient or rare-steady interest from a category the
  user never touched, and must lose.

Generation is vectorised per user (numpy), seeded per user from (seed, user index), so
a user's rows do not depend on how many users are generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

RECENT_WINDOW = 100


@dataclass(frozen=True)
class LabelRule:
    """Coefficients of the click rule (docs/synthetic.md)."""

    lifelong: float = 6.0
    recent: float = 3.0
    quality: float = 0.7
    bias: float = -4.5


@dataclass(frozen=True)
class World:
    """Items and categories shared by all users."""

    item_id: np.ndarray  # (I,) external ids, grouped by category
    item_cat: np.ndarray  # (I,) category of each item
    quality: np.ndarray  # (I,) float
    cat_start: np.ndarray  # (C+1,) offsets of each category's items
    cat_cdf: np.ndarray  # (I,) c + within-category cumulative popularity, in (c, c+1]
    cat_pop: np.ndarray  # (C,) global category popularity (sums to 1)

    def sample_items(self, rng: np.random.Generator, cats: np.ndarray) -> np.ndarray:
        """Item indices (into the world arrays), popularity-weighted within each category."""
        pos = np.searchsorted(self.cat_cdf, cats + rng.random(cats.size), side="right")
        out: np.ndarray = np.minimum(pos, self.cat_start[cats + 1] - 1)
        return out


def make_world(items: int, categories: int, rng: np.random.Generator) -> World:
    cat_pop = 1.0 / np.arange(1, categories + 1) ** 0.9
    cat_pop /= cat_pop.sum()
    # Every category gets one item, the rest follow category popularity.
    cats = np.concatenate(
        [np.arange(categories), rng.choice(categories, size=items - categories, p=cat_pop)]
    )
    cats = np.sort(cats)
    cat_start = np.searchsorted(cats, np.arange(categories + 1))
    pop = rng.lognormal(0.0, 1.2, size=items)
    within = np.cumsum(pop)
    before = np.concatenate([[0.0], within])[cat_start[:-1]]
    total = within[cat_start[1:] - 1] - before
    cdf = cats + (within - before[cats]) / total[cats]
    return World(
        item_id=rng.permutation(items).astype(np.int64),
        item_cat=cats.astype(np.int64),
        quality=rng.standard_normal(items),
        cat_start=cat_start.astype(np.int64),
        cat_cdf=cdf,
        cat_pop=cat_pop,
    )


def _history(
    n: int, world: World, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(item index, category, action, ts, interest categories) of one user's n events."""
    n_cat = world.cat_pop.size
    f = np.arange(n) / n  # position in the user's life
    cats = rng.choice(n_cat, size=n, p=world.cat_pop)  # background browsing
    interest = np.zeros(n, dtype=bool)
    picks = rng.choice(n_cat, size=9, replace=False)
    ancient, mid, steady, drift = picks[:3], picks[3:5], picks[5:8], picks[8]
    u = rng.random((4, n))

    def put(mask: np.ndarray, choices: np.ndarray, weights: np.ndarray | None = None) -> None:
        cats[mask] = rng.choice(choices, size=int(mask.sum()), p=weights)
        interest[mask] = True

    a_end = rng.uniform(0.15, 0.4)
    put(((f < a_end) & (u[0] < 0.5)) | (u[0] < 0.001), ancient, rng.dirichlet([2.0] * 3))
    m0 = rng.uniform(0.3, 0.55)
    put((f >= m0) & (f < m0 + rng.uniform(0.1, 0.25)) & (u[1] < 0.35), mid)
    put(u[2] < 0.012, steady)
    put((f >= rng.uniform(0.9, 0.98)) & (u[3] < 0.5), np.array([drift]))

    # Actions: 0 view, 1 like, 2 share; interest events are liked and shared more.
    a = rng.random(n)
    action = np.where(interest, (a > 0.5).astype(np.int64) + (a > 0.85), (a > 0.8) + (a > 0.97))
    gaps = np.maximum(1, np.rint(rng.lognormal(np.log(300.0), 1.8, size=n))).astype(np.int64)
    ts = 1_300_000_000 + int(rng.integers(0, 50_000_000)) + np.cumsum(gaps)
    items = world.sample_items(rng, cats)
    interests = np.concatenate([ancient, mid, steady])
    return items, cats.astype(np.int64), action.astype(np.int64), ts, interests


def _user_rows(
    user: str, n: int, n_req: int, world: World, rule: LabelRule, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """All rows of one user (history and requests) in file order."""
    items, cats, action, ts, interests = _history(n, world, rng)
    n_cat = world.cat_pop.size
    weight = 1.0 + action
    lo = int(np.ceil(0.7 * n))
    at = np.sort(rng.choice(np.arange(lo, n), size=min(n_req, n - lo), replace=False))

    counts = np.zeros(n_cat)
    done = 0
    clicked_pos: list[np.ndarray] = []  # merged-order positions: request at k sits at k - 0.5
    clicked_cat: list[np.ndarray] = []
    req_rows: list[tuple[int, np.ndarray, np.ndarray]] = []
    for k in at:
        counts += np.bincount(cats[done:k], weights=weight[done:k], minlength=n_cat)
        done = k
        # The last RECENT_WINDOW behaviours before the request, clicks included.
        pos = np.concatenate([np.arange(max(0, k - RECENT_WINDOW), k), *clicked_pos])
        rc = np.concatenate([cats[max(0, k - RECENT_WINDOW) : k], *clicked_cat])
        rw = np.concatenate(
            [weight[max(0, k - RECENT_WINDOW) : k], *[np.ones(c.size) for c in clicked_cat]]
        )
        last = np.argsort(pos, kind="stable")[-RECENT_WINDOW:]
        recent = np.bincount(rc[last], weights=rw[last], minlength=n_cat).astype(np.float64)
        recent = recent / max(float(recent.sum()), 1e-9)

        m = int(rng.integers(15, 26))
        n_life, n_recent = int(rng.integers(4, 8)), int(rng.integers(3, 7))
        cand_cats = np.concatenate(
            [
                rng.choice(interests, size=n_life),
                rng.choice(rc[last], size=n_recent) if last.size else np.zeros(0, np.int64),
                rng.choice(n_cat, size=max(0, m - n_life - n_recent), p=world.cat_pop),
            ]
        )
        cand = world.sample_items(rng, cand_cats)
        _, first = np.unique(cand, return_index=True)
        cand = cand[rng.permutation(np.sort(first))]
        c_cat = world.item_cat[cand]
        lifelong = np.log1p(counts[c_cat]) / np.log1p(max(counts.sum(), 1.0))
        logit = (
            rule.lifelong * lifelong
            + rule.recent * recent[c_cat]
            + rule.quality * world.quality[cand]
            + rule.bias
        )
        label = (rng.random(cand.size) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        req_rows.append((int(k), cand, label))
        hit = c_cat[label == 1]
        counts += np.bincount(hit, minlength=n_cat)
        clicked_pos.append(np.full(hit.size, k - 0.5))
        clicked_cat.append(hit)

    # File order: history event i at key 2i+1, request at k just before event k (key 2k).
    key = [2 * np.arange(n) + 1] + [np.full(c.size, 2 * k) for k, c, _ in req_rows]
    order = np.argsort(np.concatenate(key), kind="stable")
    all_items = np.concatenate([items] + [c for _, c, _ in req_rows])
    req_ids = np.concatenate(
        [np.full(n, "", dtype=object)]
        + [np.full(c.size, f"{user}-r{j}", dtype=object) for j, (_, c, _) in enumerate(req_rows)]
    )
    return {
        "item_id": world.item_id[all_items][order],
        "category": world.item_cat[all_items][order],
        "ts": np.concatenate([ts] + [np.full(c.size, ts[k]) for k, c, _ in req_rows])[order],
        "action": np.concatenate([action] + [np.zeros(c.size, np.int64) for _, c, _ in req_rows])[
            order
        ],
        "label": np.concatenate([np.ones(n, np.int8)] + [lb for _, _, lb in req_rows])[order],
        "request_id": req_ids[order],
    }


def generate(
    users: int,
    min_len: int,
    max_len: int,
    items: int,
    categories: int,
    requests_per_user: int,
    seed: int,
    *,
    progress: bool = False,
    rule: LabelRule | None = None,
) -> pd.DataFrame:
    """Generic-format rows of `users` lifelong users (see the module docstring)."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if categories < 10 or items < categories:
        raise ValueError("need categories >= 10 and items >= categories")
    if users < 1 or requests_per_user < 1:
        raise ValueError("need users >= 1 and requests_per_user >= 1")
    rule = rule or LabelRule()
    world = make_world(items, categories, np.random.default_rng([seed, 0]))
    lengths = np.exp(
        np.random.default_rng([seed, 1]).uniform(np.log(min_len), np.log(max_len + 1), users)
    )
    lengths = np.clip(lengths.astype(np.int64), min_len, max_len)
    width = len(str(users - 1))
    parts: list[dict[str, np.ndarray]] = []
    names: list[str] = []
    for u in tqdm(range(users), desc="synthetic users", unit="user", disable=not progress):
        name = f"u{u:0{width}d}"
        rng = np.random.default_rng([seed, 2, u])
        parts.append(_user_rows(name, int(lengths[u]), requests_per_user, world, rule, rng))
        names.append(name)
    sizes = [p["item_id"].size for p in parts]
    df = pd.DataFrame(
        {"user_id": np.repeat(np.asarray(names, dtype=object), sizes)}
        | {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    )
    return df[["user_id", "item_id", "category", "ts", "action", "label", "request_id"]]


def write_log(df: pd.DataFrame, out: Path) -> Path:
    """Write a generic-format frame as .parquet or .csv (by extension)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix in (".parquet", ".pq"):
        df.to_parquet(out, index=False)
    elif suffix == ".csv":
        df.to_csv(out, index=False)
    else:
        raise ValueError(f"--out must end in .parquet or .csv, got {out.name}")
    return out
