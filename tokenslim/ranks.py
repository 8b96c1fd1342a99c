"""This process's place in a ``torchrun`` job, and the few collectives every long job shares.

Exact sharding: timm's and DeiT's distributed evaluation pad the last shard with duplicates and
average per-batch accuracies; here every rank takes a disjoint shard of whole batches, batch
``rank``, ``rank + world``, ... (an empty shard still joins the reductions), so every image is
computed in the very batch a single process would put it in (matrix kernels pick their blocking by
batch size, so another batch could change the last bit of an output), and integer counts are
summed: results equal a single-process run exactly.

Decisions made once: files (journals, outputs) are read and written by rank 0 alone and what it
read is shared (:func:`on_main`), so every rank replays the same rows and takes the same branch; an
error raised on rank 0 is raised on every rank, so no rank is left waiting in a collective.

Torch only: the bottom layer, usable by evaluation, measurement, searches and training alike.
"""
from __future__ import annotations

import os
from typing import Optional
from dataclasses import dataclass
from typing import Callable, List, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

T = TypeVar("T")


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


def launched_world_size() -> int:
    """The world size ``torchrun`` launched this process into (1 when not launched by it), whether
    or not the process group has been joined yet."""
    return max(current().world_size, int(os.environ.get("WORLD_SIZE", "1") or 1))


def local_world_size() -> int:
    """Ranks on this host (``torchrun``'s ``LOCAL_WORLD_SIZE``; 1 when alone)."""
    return max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1) if current().world_size > 1 else 1


def shard_indices(n: int, rank: int, world_size: int, block: int = 1) -> List[int]:
    """The items of blocks ``rank, rank + world, ...`` of ``block`` consecutive items each, in
    order: disjoint, covering every item once, no padding (``block=1``: items ``rank, rank +
    world, ...``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return [i for start in range(rank * block, n, world_size * block) for i in range(start, min(start + block, n))]


def shard(dataset: Dataset, info: DistInfo, block: int = 1) -> Dataset:
    """This rank's shard of ``dataset`` in blocks of ``block`` items (the whole dataset when alone)."""
    if info.world_size == 1:
        return dataset
    return Subset(dataset, shard_indices(len(dataset), info.rank, info.world_size, block))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place; returned for convenience)."""
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_rows(local: torch.Tensor, n: int, info: DistInfo, block: int = 1) -> torch.Tensor:
    """The rows of every rank's :func:`shard` of ``n`` items (in blocks of ``block``), back in the
    items' order (every rank gets the whole ``[n, ...]`` tensor; ``local`` itself when alone)."""
    if info.world_size == 1:
        return local
    size = max(len(shard_indices(n, r, info.world_size, block)) for r in range(info.world_size))
    padded = local.new_zeros((size,) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    out = local.new_empty((n,) + tuple(local.shape[1:]))
    for rank, part in enumerate(parts):
        idx = shard_indices(n, rank, info.world_size, block)
        out[idx] = part[:len(idx)]
    return out


def _picklable(value: object) -> bool:
    import pickle

    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001  any failure means: send it as text
        return False


def on_main(fn: Callable[[], T], info: Optional[DistInfo] = None) -> T:
    """``fn()`` run on rank 0 alone, its value (or the exception it raised) handed to every rank.

    For what must happen once and be the same everywhere: reading a journal, checking a
    fingerprint, a measurement. The other ranks wait meanwhile; an exception is raised on every
    rank, so none is left in a collective that rank 0 never reaches. Alone: ``fn()``.
    """
    info = info or current()
    if info.world_size == 1:
        return fn()
    payload = [None]
    if info.is_main:
        try:
            payload[0] = (True, fn())
        except Exception as e:  # noqa: BLE001  handed on and raised on every rank below
            payload[0] = (False, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if not ok:
        raise value
    return value


__all__ = ["DistInfo", "all_reduce_sum", "current", "gather_rows", "init_from_env", "launched_world_size",
           "local_world_size", "on_main", "shard", "shard_indices"]
