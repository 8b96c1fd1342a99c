"""How a recovery run reads its data: one global order per epoch, each rank's share of every global
batch, per-image seeded augmentation, and streams that cannot be shuffled."""
from __future__ import annotations

import random
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate


class SeededItems(Dataset):
    """``data`` with each item's random transform drawn from a seed of its own (run seed, epoch,
    index): two identical runs see identical augmented images, a resumed run sees what the
    uninterrupted one would have, whatever the worker and rank counts. The caller's random state
    is kept."""

    def __init__(self, data: Dataset, seed: int, epoch: int) -> None:
        self.data, self.seed, self.epoch = data, seed, epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        item_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        saved = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)  # timm's random-resized crop draws from Python's generator
                return self.data[index]
        finally:
            random.setstate(saved)


def global_batches(order: Sequence[int], global_batch: int) -> List[List[int]]:
    """The epoch's global batches in ``order``; a last partial batch is dropped (every step sees
    exactly ``global_batch`` images, on any number of ranks)."""
    return [list(order[i:i + global_batch]) for i in range(0, len(order) - global_batch + 1, global_batch)]


def rank_micro_batches(batches: Sequence[Sequence[int]], rank: int, world: int, accum: int) -> List[List[int]]:
    """This rank's micro-batches: its contiguous share of every global batch, cut into ``accum``
    pieces, in step order (``accum`` consecutive micro-batches make one optimizer step)."""
    out = []
    for batch in batches:
        share = len(batch) // world
        mine = batch[rank * share:(rank + 1) * share]
        micro = share // accum
        out.extend(mine[i * micro:(i + 1) * micro] for i in range(accum))
    return out


def stream_micro_batches(data: IterableDataset, global_batch: int, rank: int, world: int, accum: int,
                         skip: int, presplit: bool = False) -> Iterator[Tuple[int, list]]:
    """``(global batch index, collated micro-batch)`` for this rank from a stream, in the stream's
    order: item ``j`` belongs to global batch ``j // global_batch`` and each rank takes its share of
    it; a ``presplit`` stream (one whose reader already gives each rank its own shards, as timm's
    webdataset and streaming readers do) is this rank's alone, ``global_batch / world`` items per
    batch. The first ``skip`` global batches (done before an interruption) are read past."""
    share = global_batch // world
    micro = share // accum
    pending: List = []
    for j, item in enumerate(data):
        if presplit:
            b, pos = divmod(j, share)
            pos += rank * share
        else:
            b, pos = divmod(j, global_batch)
        if b < skip or not rank * share <= pos < (rank + 1) * share:
            continue
        pending.append(item)
        if len(pending) == micro:
            yield b, default_collate(pending)
            pending = []


def is_presplit(data: IterableDataset) -> bool:
    """Whether a stream's reader already splits it over the ranks (timm's iterable datasets)."""
    try:
        from timm.data import IterableImageDataset
    except ImportError:
        return False
    return isinstance(data, IterableImageDataset)


def stream_length(data: IterableDataset) -> Optional[int]:
    """The length of a stream if it states one (``__len__``), else ``None``."""
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def epoch_plan(data: Dataset, batch_size: int, world: int, accum: int) -> Tuple[int, Optional[int], Optional[int]]:
    """``(images per micro-batch on each rank, images in the data, steps per epoch)`` for a global
    batch of ``batch_size`` over ``world`` ranks and ``accum`` accumulation steps; the counts are
    ``None`` for a stream of unknown length. Refuses a batch that does not split evenly and data
    smaller than one global batch."""
    if batch_size % (world * accum):
        raise ValueError(f"the global batch {batch_size} does not split evenly over {world} ranks x {accum} "
                         f"accumulation steps; pick a multiple of {world * accum}")
    streaming = isinstance(data, IterableDataset)
    n = stream_length(data) if streaming else len(data)
    if n is not None and streaming and is_presplit(data):
        n *= world  # each rank's reader holds its own share
    if n is not None and n < batch_size:
        raise ValueError(f"the training data has {n} images, fewer than one global batch ({batch_size}); use a "
                         "smaller batch or more images")
    return batch_size // (world * accum), n, (n // batch_size if n is not None else None)
