"""Data-parallel training on CPU: torch DistributedDataParallel over gloo.

Two ways in, one code path (the `env://` rendezvous):

* `torchrun --nproc_per_node N -m ifa_rank.cli train ...` (one node or several): torchrun
  sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, read by
  `RankInfo.from_env`;
* `ifa-rank train --ddp N`: `launch` spawns N local processes that talk over 127.0.0.1
  on a free port, with the same variables set.

Every rank loads the same dataset and builds the same initial weights (same seed; DDP
also broadcasts rank 0's), trains on its `shard` of the epoch's shuffled users, and DDP
averages the gradients at each optimizer step. Rank 0 alone evaluates, picks the best
epoch, writes the outputs and decides early stopping (`agree`); the others write nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.multiprocessing.spawn import ProcessException, spawn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")

BACKEND = "gloo"  # CPU tensors; on GPUs nccl would be the choice
TIMEOUT = timedelta(hours=1)  # the other ranks wait in a collective while rank 0 evaluates
LAUNCH_ENV = ("RANK", "WORLD_SIZE")  # set by torchrun and by `launch`: this is a rank
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT")  # what `env://` needs besides them
# Test hook: when set, every rank saves its final weights to DIR/rank{RANK}.pt (outputs
# proper still come from rank 0 only).
DUMP_ENV = "IFA_DDP_DUMP_DIR"


class LaunchError(RuntimeError):
    """A rank started by `launch` failed (its traceback is in the message)."""


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands; `RankInfo()` is the plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # started by torchrun or --ddp (even with one rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RankInfo:
        """The rank torchrun (or `launch`) gave this process; single-process otherwise."""
        env = os.environ if env is None else env
        if not all(k in env for k in LAUNCH_ENV):
            return cls()
        missing = [k for k in RENDEZVOUS_ENV if not env.get(k)]
        if missing:
            raise SystemExit(f"distributed run (RANK/WORLD_SIZE set) without {missing}")
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if not 0 <= rank < world:
            raise SystemExit(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, int(env.get("LOCAL_RANK", rank)), distributed=True)


@contextmanager
def process_group(info: RankInfo) -> Iterator[None]:
    """The gloo process group for the duration of a run (nothing when not distributed)."""
    if not info.distributed:
        yield
        return
    dist.init_process_group(
        BACKEND,
        init_method="env://",
        rank=info.rank,
        world_size=info.world_size,
        timeout=TIMEOUT,
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, info: RankInfo, find_unused: bool = True) -> nn.Module:
    """DDP around `model` when distributed; the model itself otherwise.

    find_unused: some weights may be left out of a forward's graph (the baselines skip
    their sequence side for a user whose requests have no history); DDP then walks the
    graph each step to mark them done. False for a model that uses every weight always.
    Buffers are constants built from the config: synced once at start, not per forward.
    """
    if not info.distributed:
        return model
    return DistributedDataParallel(
        model, find_unused_parameters=find_unused, forward_sync_buffers=False
    )


def grad_sync(net: nn.Module, stepping: bool) -> AbstractContextManager[Any]:
    """Around a micro-batch's forward and backward: skip the gradient all-reduce
    (`no_sync`) unless the optimizer steps after it."""
    if isinstance(net, DistributedDataParallel) and not stepping:
        return net.no_sync()
    return nullcontext()


def shard(items: Sequence[T], info: RankInfo) -> list[T]:
    """Rank r's part of `items`: r, r + W, r + 2W, ... after padding `items` by wrapping
    around to a multiple of W, so that every rank gets ceil(n / W) and steps as often."""
    n, world = len(items), info.world_size
    if world == 1 or n == 0:
        return list(items)
    total = -(-n // world) * world
    padded = [items[i % n] for i in range(total)]
    return padded[info.rank :: world]


def mean_over_ranks(values: Sequence[float], info: RankInfo) -> float:
    """The mean of every rank's `values` (a rank's own mean when not distributed)."""
    if not info.distributed:
        return float(np.mean(values))
    t = torch.tensor([float(sum(values)), float(len(values))], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1])


def agree(flag: bool, info: RankInfo) -> bool:
    """Rank 0's `flag` on every rank (early stopping: all ranks stop together)."""
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


def barrier(info: RankInfo) -> None:
    if info.distributed:
        dist.barrier()


def dump_state(model: nn.Module, info: RankInfo) -> None:
    """The test hook of `DUMP_ENV`: this rank's weights to DIR/rank{rank}.pt."""
    where = os.environ.get(DUMP_ENV)
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), Path(where) / f"rank{info.rank}.pt")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch(nprocs: int, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` in `nprocs` local processes set up as torchrun would set up ranks
    0..nprocs-1 (loopback rendezvous on a free port). Returns when all have finished;
    if one fails, the others are stopped and LaunchError is raised."""
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    port = free_port()
    try:
        spawn(_rank_main, args=(nprocs, port, fn, args), nprocs=nprocs)
    except ProcessException as e:
        raise LaunchError(str(e)) from e


def _rank_main(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    fn(*args)
