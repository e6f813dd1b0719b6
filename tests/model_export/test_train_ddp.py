"""Data-parallel training (DDP over gloo, CPU) with real processes on loopback.

Two launches, each shared by several tests: `ifa-rank train --ddp 2` (in-process CLI,
which spawns two ranks) and two torchrun "nodes" of one rank each, each started in its
own working directory with a relative `--out`, so that anything rank 1 wrote would show.
Every rank dumps its final weights through the `IFA_DDP_DUMP_DIR` test hook.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ifa_common.records import make_events
from ifa_rank.cli import main
from model_export import distributed
from model_export.checkpoint import load_model
from model_export.data.synthetic import generate, write_log
from model_export.distributed import DUMP_ENV, RankInfo
from model_export.model import build_model
from model_export.model.config import ModelConfig
from model_export.onnx.verify import PARITY_ATOL, torch_logits
from model_export.presets import resolve
from model_export.train import train_model
from service.engine.runtime import ModelRuntime

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = {"checkpoint.pt", "metrics.json", "curves.png"}
EPOCHS = 4


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = generate(
        users=12, min_len=60, max_len=300, items=300, categories=12, requests_per_user=5, seed=3
    )
    return write_log(frame, tmp_path_factory.mktemp("data") / "log.csv")


def _train_argv(log_file: Path, out: str, model: str, seed: int, epochs: int) -> list[str]:
    return [
        "train", "--data", str(log_file), "--model", model, "--preset", "tiny",
        "--out", out, "--seed", str(seed), "--epochs", str(epochs),
        "--set", "patience=100", "--set", "threads=1",
    ]  # fmt: skip


def _dumps(where: Path) -> list[dict[str, torch.Tensor]]:
    assert sorted(p.name for p in where.iterdir()) == ["rank0.pt", "rank1.pt"]
    return [torch.load(where / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


# ------------------------------------------------------------------ ifa-rank train --ddp 2
@pytest.fixture(scope="module")
def ddp_run(log_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp")
    out, dump = tmp / "run", tmp / "dump"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DUMP_ENV, str(dump))
        rc = main([*_train_argv(log_file, str(out), "ifa", 1, EPOCHS), "--ddp", "2"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    return {"tmp": tmp, "out": out, "dump": dump, "metrics": metrics}


def test_ranks_end_with_identical_trained_weights(ddp_run: dict[str, Any]) -> None:
    rank0, rank1 = _dumps(ddp_run["dump"])
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # ...and training moved them away from the (shared) initial weights
    cfg = ModelConfig.from_dict(ddp_run["metrics"]["config"])
    torch.manual_seed(1)
    initial = build_model(cfg).state_dict()
    moved = [n for n in initial if not torch.equal(initial[n], rank0[n])]
    assert len(moved) > len(initial) // 2


def test_training_loss_falls_and_metrics_record_the_run(ddp_run: dict[str, Any]) -> None:
    metrics = ddp_run["metrics"]
    assert metrics["world_size"] == 2
    assert metrics["epochs_run"] == EPOCHS == len(metrics["history"])
    losses = [h["train_loss"] for h in metrics["history"]]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert 0.0 <= metrics["test"]["auc"] <= 1.0


def test_only_rank0_writes_outputs(ddp_run: dict[str, Any]) -> None:
    tmp = ddp_run["tmp"]
    assert {p.name for p in ddp_run["out"].iterdir()} == OUTPUTS
    assert {p.name for p in tmp.iterdir()} == {"run", "dump"}


def test_ddp_checkpoint_exports_with_parity(ddp_run: dict[str, Any], tmp_path: Path) -> None:
    art = tmp_path / "art"
    ckpt = ddp_run["out"] / "checkpoint.pt"
    assert main(["export", str(ckpt), "--out", str(art)]) == 0  # verifies parity itself
    model, saved = load_model(ckpt)
    assert saved["metrics"]["test"]["auc"] == ddp_run["metrics"]["test"]["auc"]
    rt = ModelRuntime.load(art, None, prefer_cuda=False)
    table = saved["item_table"]["item_id"].numpy()
    rng = np.random.default_rng(7)
    for n, mc in ((0, 1), (1, 20), (57, 50), (3000, 333)):
        events = make_events(
            rng.choice(table, n),
            1_700_000_000 + np.sort(rng.integers(0, 200 * 86_400, n)),
            action=rng.integers(0, 3, n),
        )
        items = np.concatenate(
            [rng.choice(table, mc - mc // 4), rng.integers(10**6, 10**7, mc // 4)]
        )
        got = rt.score(rt.build_state(events), items)
        want = torch_logits(model, model.cfg, events, items, rt.lookup_categories)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=0, atol=PARITY_ATOL)


def test_early_stop_is_taken_by_every_rank(
    log_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lr 0: valid AUC never improves after epoch 1, so rank 0 stops after epoch 2 of 5; a
    # rank that missed the decision would go on alone and fail in its next all-reduce
    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "dump"))
    argv = _train_argv(log_file, str(tmp_path / "run"), "ifa", 0, 5)
    assert main([*argv, "--set", "lr=0.0", "--set", "patience=1", "--ddp", "2"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["epochs_run"], metrics["best_epoch"]) == (2, 1)
    assert len(_dumps(tmp_path / "dump")) == 2  # both ranks left the loop and finished


def test_a_failing_rank_fails_the_launch(
    log_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _train_argv(log_file, str(tmp_path / "run"), "ifa", 0, 1)
    assert main([*argv, "--set", "set_size=0", "--ddp", "2"]) == 1  # ValueError in the ranks
    assert "distributed training failed" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --------------------------------------------------------------- torchrun, two "nodes"
@pytest.fixture(scope="module")
def torchrun_nodes(log_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two torchrun agents, --nnodes 2 --node_rank 0/1 with one rank each (static
    rendezvous, so node 0 holds rank 0), a `din` model (DDP with unused weights)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    nodes, dump = [tmp / "node0", tmp / "node1"], tmp / "dump"
    env = {
        **os.environ,
        DUMP_ENV: str(dump),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    port = distributed.free_port()
    procs = []
    for node_rank, cwd in enumerate(nodes):
        cwd.mkdir()
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
            "--node_rank", str(node_rank), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "ifa_rank.cli", *_train_argv(log_file, "run", "din", 2, 2),
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(procs, logs, strict=True):
        assert p.returncode == 0, text
    assert "best epoch" in logs[0] and "best epoch" not in logs[1]
    return {"node0": nodes[0], "node1": nodes[1], "dump": dump}


def test_torchrun_rank1_writes_nothing(torchrun_nodes: dict[str, Path]) -> None:
    assert list(torchrun_nodes["node1"].iterdir()) == []
    node0 = torchrun_nodes["node0"]
    assert [p.name for p in node0.iterdir()] == ["run"]
    assert {p.name for p in (node0 / "run").iterdir()} == OUTPUTS
    metrics = json.loads((node0 / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["model"] == "din"


def test_torchrun_ranks_end_with_identical_weights(torchrun_nodes: dict[str, Path]) -> None:
    rank0, rank1 = _dumps(torchrun_nodes["dump"])
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name


# ------------------------------------------------------------------------- plumbing
def test_rank_info_from_env() -> None:
    assert RankInfo.from_env({}) == RankInfo() and not RankInfo().distributed
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    rendezvous = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    info = RankInfo.from_env({**env, **rendezvous})
    assert info == RankInfo(rank=3, world_size=4, local_rank=1, distributed=True)
    assert not info.is_main
    with pytest.raises(SystemExit, match="MASTER_ADDR"):
        RankInfo.from_env(env)
    with pytest.raises(SystemExit, match="outside"):
        RankInfo.from_env({**env, **rendezvous, "RANK": "4"})


@pytest.mark.parametrize(("n", "world"), [(12, 2), (13, 2), (10, 3), (2, 4), (0, 2), (5, 1)])
def test_shard_covers_every_item_with_equal_lengths(n: int, world: int) -> None:
    items = list(range(100, 100 + n))
    parts = [distributed.shard(items, RankInfo(r, world, r, True)) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # every rank steps as often
    assert len(parts[0]) == -(-n // world)
    assert sorted(set(itertools.chain(*parts))) == items  # nothing dropped, padding only repeats
    if world > 1 and n >= world:
        assert parts[0][:2] == items[0 : 2 * world : world]  # rank r: r, r + W, ...
        assert not set(parts[0][: n // world]) & set(parts[1][: n // world])


def test_ddp_flag_is_refused_under_torchrun(
    log_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1")):
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(SystemExit, match="torchrun"):
        main([*_train_argv(log_file, str(tmp_path / "run"), "ifa", 0, 1), "--ddp", "2"])
    assert not (tmp_path / "run").exists()


def test_single_process_metrics_record_world_size_one(log_file: Path, tmp_path: Path) -> None:
    cfg, tc = resolve("tiny", "mean_pool", [], 1, 0)
    metrics = train_model(str(log_file), cfg, tc, tmp_path, "tiny", progress=False)
    assert metrics["world_size"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["world_size"] == 1
