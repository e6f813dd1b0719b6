"""Handlers of the `ifa-rank` subcommands that live in model_export (see ifa_rank/cli.py).

Each takes the argparse Namespace and returns an exit code. Imports sit inside the
handlers so that one subcommand does not pay for another's dependencies.
"""

from __future__ import annotations

import argparse
import sys


def data_movielens(args: argparse.Namespace) -> int:
    """Fetch MovieLens-100k from the recbole wheel and convert it to the generic format."""
    from pathlib import Path

    from model_export.data.logs import load_log
    from model_export.data.movielens import DataUnavailable, prepare

    try:
        path = prepare(Path(args.dir))
    except DataUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    log = load_log(path)
    n_items = int(log.item_ids.size)
    n_ratings = log.num_rows
    print(
        f"MovieLens-100k ready: {path} ({log.num_users} users, {n_items} items, "
        f"{n_ratings} ratings, {log.num_events} positives, {log.num_requests} requests)"
    )
    return 0


def data_synthetic(args: argparse.Namespace) -> int:
    """Generate lifelong synthetic users (docs/synthetic.md) and write them to --out."""
    import time
    from pathlib import Path

    from model_export.data.synthetic import generate, write_log

    out = Path(args.out)
    if out.suffix.lower() not in (".parquet", ".pq", ".csv"):
        print(f"error: --out must end in .parquet or .csv, got {out.name}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        df = generate(
            users=args.users,
            min_len=args.min_len,
            max_len=args.max_len,
            items=args.items,
            categories=args.categories,
            requests_per_user=args.requests,
            seed=args.seed,
            progress=True,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_log(df, out)
    is_req = (df["request_id"] != "").to_numpy()
    print(
        f"wrote {out}: {len(df)} rows, {args.users} users, {int((~is_req).sum())} history "
        f"events, {df['request_id'][is_req].nunique()} requests, positive rate "
        f"{df['label'][is_req].mean():.3f}, {time.perf_counter() - t0:.1f}s"
    )
    return 0


def export(args: argparse.Namespace) -> int:
    """`ifa-rank export CHECKPOINT --out artifacts/ [--version V]`: ONNX artifact + latest."""
    from model_export.export import export_checkpoint
    from model_export.onnx.graphs import ExportError

    try:
        path = export_checkpoint(args.checkpoint, args.out, version=args.version)
    except ExportError as e:
        print(f"error: export failed: {e}", file=sys.stderr)
        return 2
    print(f"exported {path.name} to {path} ({path.parent / 'latest'} -> {path.name})")
    return 0
