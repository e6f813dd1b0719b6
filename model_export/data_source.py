"""`--data movielens | synthetic | PATH` -> a Dataset, preparing files on first use."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from model_export.model.config import ModelConfig
from model_export.presets import SYNTHETIC, TrainConfig

DATA_ROOT = Path("data")


def resolve_path(data: str, preset: str | None) -> Path:
    if data == "movielens":
        from model_export.data.movielens import prepare

        return prepare(DATA_ROOT)
    if data == "synthetic":
        from model_export.data.synthetic import generate, write_log

        spec = SYNTHETIC[preset or "small"]
        path = DATA_ROOT / "synthetic" / f"lifelong-{preset or 'small'}.parquet"
        if not path.exists():
            frame = generate(**asdict(spec), seed=0, progress=True)
            write_log(frame, path.with_suffix(".tmp.parquet")).replace(path)
        return path
    path = Path(data)
    if not path.is_file():
        raise SystemExit(f"--data: {data!r} is neither movielens, synthetic nor a file")
    return path


def load_dataset(data: str, cfg: ModelConfig, tc: TrainConfig, preset: str | None) -> Any:
    from model_export.data.dataset import build_dataset
    from model_export.data.logs import load_log

    log = load_log(resolve_path(data, preset))
    dataset = build_dataset(log, cfg, set_size=tc.set_size, seed=tc.seed, max_users=tc.max_users)
    return dataset
