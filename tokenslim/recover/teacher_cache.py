"""The teacher's outputs kept per training image, so each is computed once instead of every epoch.

The teacher is frozen, so on an image that is the same every epoch (the evaluation transform, or
that transform and a horizontal flip, which this module applies itself) its output never changes.
On small models the teacher's forward pass is about half of a recovery step; after the first epoch
a cached run pays for the student alone. Random crops, mixup and class-token matching see a new
input or need the teacher's inner states every step, so they cannot be cached.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def flip_draws(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of ``n`` images are flipped in ``epoch``: one seeded draw per epoch, so every rank, any
    worker count and a resumed run flip the same images."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 7_919 + 17)
    return torch.rand(n, generator=g) < 0.5


def apply_flips(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``images`` ``[B, C, H, W]`` with those marked in ``flips`` ``[B]`` mirrored left to right."""
    if not bool(flips.any()):
        return images
    return torch.where(flips.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)


class TeacherCache:
    """Teacher log-probabilities for ``n`` images, each unflipped and flipped, filled as first seen.

    ``n * 2 * classes`` float32 values, allocated when the first outputs arrive: 50,000 images of
    10 classes take 4 MB; 1.28 M images of 1,000 classes take 10 GB (the run says how much before
    it starts). Not part of the resume state: a resumed run fills it again as it goes.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.logp: torch.Tensor = torch.zeros(0)
        self.filled = torch.zeros(n, 2, dtype=torch.bool)

    @staticmethod
    def nbytes(n: int, classes: int) -> int:
        """Memory the cache of ``n`` images of ``classes`` outputs takes."""
        return n * 2 * classes * 4

    def lookup(self, indices: Sequence[int], flips: torch.Tensor, images: torch.Tensor,
               teacher_logp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The teacher's log-probabilities for a batch: ``images`` (already flipped as ``flips``
        says) of data-set ``indices``; those not seen before go through ``teacher_logp`` once."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        side = flips.long().cpu()
        missing = ~self.filled[idx, side]
        if bool(missing.any()):
            rows = missing.nonzero().squeeze(1)
            fresh = teacher_logp(images[rows.to(images.device)]).float().cpu()
            if self.logp.numel() == 0:
                self.logp = torch.zeros(self.n, 2, fresh.shape[-1])
            self.logp[idx[rows], side[rows]] = fresh
            self.filled[idx[rows], side[rows]] = True
        return self.logp[idx, side].to(images.device)
