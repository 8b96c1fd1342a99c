"""Accuracy of a (patched) model, optionally against a reference model, on one process or many."""
from __future__ import annotations

import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .. import ranks as dist_utils
from .data import check_labels, match_classes
from ..measure.benchmark import resolve_precision


@dataclass
class EvalResult:
    """Accuracy of one model on one dataset (percentages for accuracies and agreement).

    Attributes:
        images: number of images evaluated (all ranks together).
        top1, top5: accuracy in percent; ``correct1``/``correct5``: the exact counts.
        loss: mean cross-entropy.
        agreement: share (%) of images whose top-1 prediction equals the reference's.
        kl: mean KL(reference || model) of the softmax outputs.
        reference_top1: the reference model's top-1 (%), on the same images.
        top1_diff: model top-1 minus reference top-1 (points); ``top1_diff_se`` its paired standard
            error: differences smaller than about two of these are not resolved by this data.
    """

    images: int
    top1: float
    top5: float
    correct1: int
    correct5: int
    loss: float
    agreement: Optional[float] = None
    kl: Optional[float] = None
    reference_top1: Optional[float] = None
    top1_diff: Optional[float] = None
    top1_diff_se: Optional[float] = None
    seconds: float = 0.0
    world_size: int = 1
    device: str = "cpu"
    precision: str = "float32"
    settings: Dict[str, Any] = field(default_factory=dict)
    versions: Dict[str, str] = field(default_factory=dict)

    logits: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "logits"}


def _versions() -> Dict[str, str]:
    import timm

    from ..versions import __version__

    return {"tokenslim": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _progress_bar(total: int, enabled: bool, label: str):
    """A tqdm bar over images on stderr: main rank only, and only on a terminal (quiet in logs)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"  {label}", unit="img", file=sys.stderr, mininterval=1.0, leave=False,
                disable=None if enabled else True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Dataset,
    reference: Optional[nn.Module] = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: Optional[Union[str, torch.device]] = None,
    precision: str = "float32",
    progress: bool = True,
    label: str = "eval",
    reference_logits: Optional[torch.Tensor] = None,
    keep_logits: bool = False,
) -> EvalResult:
    """Top-1/top-5, loss and, given a reference model, agreement, KL and the paired top-1 difference.

    Under ``torchrun`` (process group initialised, e.g. by :func:`tokenslim.ranks.init_from_env`)
    each rank evaluates a disjoint unpadded shard of whole batches (the batches a single process
    runs, so each image's outputs are the same bits) and integer counts are summed; the loss and KL
    are summed per image in fixed point (:data:`FIXED_POINT`), so no sum depends on the order of
    images, batches or ranks: the result equals a single-process run with the same ``batch_size``
    bit for bit. Every rank returns the same result.

    Args:
        model: the model to evaluate (moved to ``device``, put in eval mode).
        data: a dataset of ``(image tensor, label)`` (see :mod:`tokenslim.evaluate.data`).
        reference: e.g. the unpatched model; evaluated on the same batches.
        batch_size: images per step.
        num_workers: data-loading worker processes.
        device: defaults to CUDA (this rank's GPU) when available, else CPU.
        precision: ``float32``, ``bfloat16``, ``float16``, ``amp_bfloat16`` or ``amp_float16``.
        progress: print progress to stderr (main rank only).
        reference_logits: logits of the reference on ``data`` in order, e.g. ``logits`` of an
            earlier result: used instead of running ``reference`` again (a sweep evaluates the
            unpatched model once). ``[len(data), classes]``, or under torchrun this rank's shard
            of them as ``keep_logits`` returns it (each rank keeps its own: nothing is gathered).
        keep_logits: keep this model's float32 logits as ``result.logits`` (not part of
            :meth:`EvalResult.to_dict`): ``[len(data), classes]``; under torchrun the rows of this
            rank's shard (:func:`tokenslim.ranks.shard_indices` with ``block=batch_size``;
            :func:`tokenslim.ranks.gather_rows` puts every rank's back in order).
    """
    _check_inputs(model, data, reference, reference_logits, batch_size)
    info = dist_utils.current()
    if device is None:
        device = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype, amp_dtype = resolve_precision(precision)
    models = [m.eval().to(device=device, dtype=dtype) for m in ([model] + ([reference] if reference else []))]
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext

    part = dist_utils.shard(data, info, block=batch_size)  # whole batches: the batches one process would run
    if reference_logits is not None and reference_logits.shape[0] != len(part):
        reference_logits = reference_logits[dist_utils.shard_indices(len(data), info.rank, info.world_size,
                                                                     batch_size)]
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    counts = torch.zeros(9, dtype=torch.int64)  # see _count_batch
    bar = _progress_bar(len(data), progress and info.is_main, label)
    start = time.perf_counter()
    kept: list = []
    offset = 0
    for images, target in loader:
        images = images.to(device=device, dtype=dtype, non_blocking=True)
        target = target.to(device)
        with amp():
            logits = models[0](images).float()
        ref_logits = None
        if reference_logits is not None:
            ref_logits = reference_logits[offset:offset + images.shape[0]].to(device).float()
        elif reference is not None:
            with amp():
                ref_logits = models[1](images).float()
        _count_batch(counts, logits, target, ref_logits)
        if keep_logits:
            kept.append(logits.cpu())
        # Progress counts all ranks' images, estimated from this rank's share.
        bar.update(images.shape[0] * info.world_size)
        offset += images.shape[0]
    bar.close()
    dist_utils.all_reduce_sum(counts, info)
    result = _result(counts, reference is not None or reference_logits is not None,
                     seconds=time.perf_counter() - start, world_size=info.world_size, device=str(device),
                     precision=precision, settings=model.tokenslim.as_dict() if hasattr(model, "tokenslim") else {},
                     versions=_versions())
    if keep_logits:  # an empty shard (more ranks than batches) keeps no rows, but keeps them all the same
        result.logits = torch.cat(kept) if kept else torch.empty(0, 0)
    return result


def _check_inputs(model: nn.Module, data: Dataset, reference: Optional[nn.Module],
                  reference_logits: Optional[torch.Tensor], batch_size: int) -> None:
    """Refuse what cannot be evaluated before any image is read, saying what to change."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_classes = getattr(model, "num_classes", None)
    ref_classes = getattr(reference, "num_classes", None) if reference is not None else None
    if isinstance(num_classes, int) and isinstance(ref_classes, int) and ref_classes != num_classes:
        raise ValueError(f"the reference model has {ref_classes} classes and the model {num_classes}: "
                         "agreement and KL need the same classes")
    if isinstance(num_classes, int):
        match_classes(data, model)
        check_labels(data, num_classes)
    if reference_logits is not None:
        if reference is not None:
            raise ValueError("pass either reference or reference_logits, not both")
        info = dist_utils.current()
        own = len(dist_utils.shard_indices(len(data), info.rank, info.world_size, batch_size))
        if reference_logits.shape[0] not in (len(data), own):
            shard = f" (or this rank's shard of {own})" if info.world_size > 1 else ""
            raise ValueError(f"reference_logits has {reference_logits.shape[0]} rows for {len(data)} images{shard}")


# Loss and KL are summed per image as integers in units of 2**-28: order-free sums (any sharding,
# batching or rank count gives the same bits), 4e-9 per image of rounding, room for 10**6 images
# of a loss up to 10**4 before an int64 could overflow.
FIXED_POINT = 2 ** 28


def _fixed(values: torch.Tensor) -> int:
    return int(torch.round(values.double() * FIXED_POINT).to(torch.int64).sum())


# counts: correct1, correct5, images, agree, ref_correct1, sum(d), sum(|d|) for d = c1 - ref_c1,
# loss and KL in FIXED_POINT units
def _count_batch(counts: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                 ref_logits: Optional[torch.Tensor]) -> None:
    """Add one batch to the integer ``counts`` (summed over ranks afterwards)."""
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    c1 = top5[:, 0] == target
    counts[0] += int(c1.sum())
    counts[1] += int((top5 == target[:, None]).any(-1).sum())
    counts[2] += logits.shape[0]
    labelled = (target >= 0) & (target < logits.shape[-1])  # unlabelled images (e.g. -1) add no loss
    if bool(labelled.any()):
        counts[7] += _fixed(F.cross_entropy(logits[labelled].double(), target[labelled], reduction="none"))
    if ref_logits is not None:
        ref_c1 = ref_logits.argmax(-1) == target
        counts[3] += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        counts[4] += int(ref_c1.sum())
        d = c1.long() - ref_c1.long()
        counts[5] += int(d.sum())
        counts[6] += int(d.abs().sum())
        ref_logp = ref_logits.log_softmax(-1).double()
        counts[8] += _fixed((ref_logp.exp() * (ref_logp - logits.log_softmax(-1).double())).sum(-1))


def _result(counts: torch.Tensor, paired: bool, **fields: Any) -> EvalResult:
    """The :class:`EvalResult` of the summed ``counts`` (with the paired fields if ``paired``)."""
    n = int(counts[2])
    if n == 0:
        raise ValueError("the dataset is empty: nothing to evaluate")
    result = EvalResult(
        images=n,
        top1=100.0 * int(counts[0]) / n,
        top5=100.0 * int(counts[1]) / n,
        correct1=int(counts[0]),
        correct5=int(counts[1]),
        loss=int(counts[7]) / FIXED_POINT / n,
        **fields,
    )
    if paired:
        mean_d = int(counts[5]) / n
        var = (int(counts[6]) - n * mean_d ** 2) / (n - 1) if n > 1 else float("nan")
        result.agreement = 100.0 * int(counts[3]) / n
        result.kl = int(counts[8]) / FIXED_POINT / n
        result.reference_top1 = 100.0 * int(counts[4]) / n
        result.top1_diff = 100.0 * mean_d
        result.top1_diff_se = 100.0 * math.sqrt(max(var, 0.0) / n)
    return result

