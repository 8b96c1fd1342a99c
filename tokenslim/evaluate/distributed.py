"""Exact distributed evaluation: disjoint unpadded shards and summed counts.

timm's and DeiT's distributed evaluation pad the last shard with duplicates and average per-batch
accuracies; here every rank takes a disjoint strided shard (an empty shard still joins the
reductions) and integer counts are summed, so results equal a single-process run exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op when alone).

    Uses NCCL when CUDA is available, else gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def current() -> DistInfo:
    """The process group already joined (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """Items ``rank, rank + world, ...``: disjoint, covering every item once, no padding."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    return list(range(rank, n, world_size))


def shard(dataset: Dataset, info: DistInfo) -> Dataset:
    """This rank's shard of ``dataset`` (the whole dataset when alone)."""
    if info.world_size == 1:
        return dataset
    return Subset(dataset, shard_indices(len(dataset), info.rank, info.world_size))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place; returned for convenience)."""
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
