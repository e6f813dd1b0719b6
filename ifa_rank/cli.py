"""`ifa-rank`: one console script, one subcommand per job.

Handlers are imported only when their subcommand runs, so `ifa-rank serve` works in an
image without torch and `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _lazy(target: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        handler: Handler = getattr(importlib.import_module(module), func)
        return handler(args)

    return run


def _add_data(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("data", help="prepare data sets (MovieLens-100k, lifelong synthetic)")
    kinds = p.add_subparsers(dest="kind", required=True)
    ml = kinds.add_parser("movielens", help="fetch MovieLens-100k from the recbole==1.2.1 wheel")
    ml.add_argument("--dir", default="data", help="data root (default: data/)")
    ml.set_defaults(func=_lazy("model_export.commands:data_movielens"))
    syn = kinds.add_parser("synthetic", help="generate lifelong synthetic users (generic format)")
    syn.add_argument("--users", type=int, default=300)
    syn.add_argument("--min-len", type=int, default=1000, help="shortest history (events)")
    syn.add_argument("--max-len", type=int, default=100_000, help="longest history (events)")
    syn.add_argument("--items", type=int, default=20_000)
    syn.add_argument("--categories", type=int, default=200)
    syn.add_argument("--requests", type=int, default=8, help="requests per user")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--out", default="data/synthetic/lifelong.parquet", help=".parquet or .csv")
    syn.set_defaults(func=_lazy("model_export.commands:data_synthetic"))


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = "ifa,din,sim_hard,twin,softmax_full,mean_pool"
    p = sub.add_parser(
        "train", help="train one model; writes checkpoint.pt, metrics.json, curves.png"
    )
    p.add_argument(
        "--data", default="movielens", help="movielens | synthetic | PATH (.csv/.parquet)"
    )
    p.add_argument("--model", default="ifa", choices=models.split(","))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="small", choices=["tiny", "small", "full"])
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a model/train config field, e.g. --set feature_map=elu",
    )
    p.add_argument(
        "--ddp",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel on this machine: start N processes (DDP over gloo, users "
        "sharded by rank); leave it out under torchrun, which starts the ranks itself",
    )
    p.set_defaults(func=_lazy("model_export.train:main"))

    e = sub.add_parser("evaluate", help="metrics of a saved checkpoint on a data set's test split")
    e.add_argument("checkpoint")
    e.add_argument("--data", default="movielens")
    e.add_argument("--split", default="test", choices=["valid", "test"])
    e.add_argument(
        "--predictions",
        default=None,
        metavar="FILE.csv",
        help="also write request_id,item_id,label,score for every logged row of the split, "
        "in the input file's row order (score = the model's probability)",
    )
    e.set_defaults(func=_lazy("model_export.evaluate:main"))

    c = sub.add_parser(
        "compare", help="train several models with one seed and budget; table + chart"
    )
    c.add_argument("--data", default="movielens")
    c.add_argument("--models", default=models)
    c.add_argument("--out", required=True)
    c.add_argument("--preset", default="small", choices=["tiny", "small", "full"])
    c.add_argument("--epochs", type=int, default=None)
    c.add_argument("--seeds", default="0", help="comma-separated seeds; the table shows the mean")
    c.add_argument("--jobs", type=int, default=1, help="trainings in parallel (one core each)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.set_defaults(func=_lazy("model_export.compare:main"))

    x = sub.add_parser("export", help="export an ifa checkpoint to artifacts/<version>/ (ONNX)")
    x.add_argument("checkpoint")
    x.add_argument("--out", default="artifacts")
    x.add_argument("--version", default=None, help="version name (default: derived)")
    x.set_defaults(func=_lazy("model_export.commands:export"))


def _add_service(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="run the ranking service under uvicorn (settings: IFA_*)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: IFA_WORKERS, 1)"
    )
    s.set_defaults(func=_lazy("service.commands:serve"))

    d = sub.add_parser("seed", help="load synthetic or MovieLens histories into Redis")
    d.add_argument("--redis-url", default=None, help="default: IFA_REDIS_URL")
    d.add_argument(
        "--cluster",
        action="store_true",
        help="the URL names a Redis Cluster node (default: IFA_REDIS_CLUSTER)",
    )
    d.add_argument("--source", default="synthetic", choices=["synthetic", "movielens"])
    d.add_argument("--users", type=int, default=100)
    d.add_argument("--length", type=int, default=1000, help="events per user")
    d.add_argument("--items", type=int, default=20_000)
    d.add_argument("--prefix", default="bench", help="user id prefix")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--length-dist",
        default="fixed",
        choices=["fixed", "loguniform"],
        help="loguniform: each user's length in [--min-length, --length]",
    )
    d.add_argument("--min-length", type=int, default=1000)
    d.add_argument("--categories", type=int, default=200, help="category = item_id %% this")
    d.add_argument(
        "--data",
        default=None,
        help="MovieLens generic-format file (default: data/ml-100k/ml100k.parquet)",
    )
    d.add_argument(
        "--via-http",
        default=None,
        metavar="URL",
        help="POST batches to URL/events (idempotent) instead of writing Redis",
    )
    d.add_argument(
        "--append",
        action="store_true",
        help="keep existing histories (default: reset the seeded users first)",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_lazy("loadtest.seed:main"))

    lg = sub.add_parser("logs", help="the service's impression log")
    lg_sub = lg.add_subparsers(dest="logs_command", required=True)
    ex = lg_sub.add_parser(
        "export",
        help="served impressions labelled by what followed, as a generic-format training "
        "log (resumable: a consumer group per stream shard)",
    )
    ex.add_argument("--out", required=True, help="FILE.parquet")
    ex.add_argument("--redis-url", default=None, help="default: IFA_REDIS_URL")
    ex.add_argument("--cluster", action="store_true", help="default: IFA_REDIS_CLUSTER")
    ex.add_argument("--shards", type=int, default=None, help="default: IFA_IMPRESSION_SHARDS")
    ex.add_argument(
        "--window-s",
        type=float,
        default=3600.0,
        help="an item acted on within this many seconds of being served is a positive; "
        "younger impressions wait for a later run",
    )
    ex.add_argument(
        "--items", default=None, help="the model's items.npz: categories of never-seen items"
    )
    ex.add_argument(
        "--metrics-textfile", default=None, help="also write the counts for node_exporter"
    )
    ex.set_defaults(func=_lazy("model_export.data.served:main"))

    b = sub.add_parser("bench", help="benchmark: in-process model costs and HTTP latency")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default="reports")
    b.add_argument(
        "--client",
        default="auto",
        choices=["auto", "wrk", "pyclient"],
        help="HTTP load generator (auto: the one with the higher ceiling)",
    )
    b.add_argument("--artifacts", default=None, help="artifacts dir (default: IFA_ARTIFACTS_DIR)")
    b.add_argument("--repeats", type=int, default=None, help="runs per figure (median)")
    b.add_argument("--duration", type=float, default=None, help="seconds per load run")
    b.add_argument("--skip-micro", action="store_true", help="no in-process model costs")
    b.add_argument("--skip-http", action="store_true", help="no end-to-end HTTP figures")
    b.set_defaults(func=_lazy("loadtest.bench:main"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ifa-rank",
        description="IFA reranking: data, training, export, serving and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_train(sub)
    _add_service(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
