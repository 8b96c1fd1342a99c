"""The recovery training loop, on one process or under ``torchrun`` (DistributedDataParallel).

:class:`Trainer` holds the run's explicit state (step, epoch, position in the epoch, the order
generator, optimizer, the best validated parameters) and the three things that touch disk or other
ranks: :meth:`Trainer.resume`, :meth:`Trainer.save` (rank 0 only) and the all-reduced metrics.
The global batch is the same on any number of ranks: each rank takes an even, contiguous share of
every global batch, DDP averages the gradients, so ``N`` ranks compute the step one process would,
and a state written on ``N`` ranks resumes on ``M``.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..evaluate import dataset_targets
from ..ranks import DistInfo, current
from .data import SeededItems, epoch_plan, global_batches, is_presplit, rank_micro_batches, stream_micro_batches
from .losses import ClassTokenTaps, distill_loss, mixup_lambda, partners
from .params import attach, freeze_key_bias
from .state import read_state, write_state
from .teacher_cache import TeacherCache, apply_flips, flip_draws
from .validation import Validation


def _all_mean(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / info.world_size


class Trainer:
    """One recovery run. See :func:`tokenslim.recover.recover` for the arguments."""

    def __init__(self, model: nn.Module, teacher: nn.Module, data: Dataset, *, method: str, steps: Optional[int],
                 epochs: Optional[float], lr: float, batch_size: int, accum: int, weight_decay: float,
                 ce_weight: float, lora_rank: int, lora_alpha: int, mixup: float, feature_weight: float,
                 temperature: float, precision: str, num_workers: int, seed: int, state_path: Optional[str],
                 save_every: int, val_data: Optional[Dataset], progress: bool, say: Callable[[str], None],
                 identity: Dict[str, Any], device: Optional[str] = None, cache_teacher: bool = False,
                 hflip: bool = False) -> None:
        self.info = current()
        if device is None:
            device = f"cuda:{self.info.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        model.to(self.device)
        teacher.to(self.device)
        self.model, self.teacher, self.data = model, teacher, data
        self.method, self.lr, self.batch_size, self.accum = method, lr, batch_size, accum
        self.ce_weight, self.mixup, self.feature_weight = ce_weight, mixup, feature_weight
        self.temperature, self.num_workers, self.seed = temperature, num_workers, seed
        self.state_path, self.save_every, self.val_data = state_path, save_every, val_data
        self.progress, self.identity = progress, identity
        self.say = say if self.info.is_main else (lambda msg: None)
        world = self.info.world_size
        self.streaming = isinstance(data, IterableDataset)
        self.micro, n, self.steps_per_epoch = epoch_plan(data, batch_size, world, accum)
        if (cache_teacher or hflip) and self.streaming:
            raise ValueError("cache_teacher and hflip follow each image by its index and need a map-style data set, "
                             "not a stream")
        if cache_teacher and (mixup > 0 or feature_weight > 0):
            raise ValueError("cache_teacher keeps the teacher's outputs per image; mixup blends new images and "
                             "feature_weight needs the teacher's inner states every step: drop one of them")
        self.hflip = hflip
        self.cache = TeacherCache(n) if cache_teacher else None
        if epochs is not None:
            if self.steps_per_epoch is None:
                raise ValueError("epochs needs a data set of known length; give steps for a stream without one")
            steps = max(1, int(round(epochs * self.steps_per_epoch)))
        self.steps = steps
        self.images = n
        self.amp = _autocast(precision, self.device)
        targets = dataset_targets(data) if not self.streaming else None
        self.use_ce = ce_weight > 0 and targets is not None and all(0 <= t < _classes(model) for t in targets)

        self.student, self.params = attach(model, method, lora_rank, lora_alpha)
        self.hooks = freeze_key_bias(model)
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=lr, weight_decay=weight_decay)
        self.warmup = max(1, self.steps // 20)
        self.ddp = None
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.type == "cuda"
            self.ddp = DistributedDataParallel(self.student, device_ids=[self.device.index] if cuda else None)
        self.g = torch.Generator().manual_seed(seed)
        self.step, self.epoch, self.batch, self.losses = 0, 0, 0, []
        self.taps: Optional[ClassTokenTaps] = None
        self.validation = Validation(val_data, _classes(model), max(self.micro, 32), self.say) if val_data else None

    # -- state -----------------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the state file when it holds this same run (any number of ranks)."""
        state = read_state(self.state_path, self.identity)
        if state is None:
            return
        if set(state["params"]) != set(self.params):
            raise ValueError(f"{self.state_path} trains other parameters than this run; delete it to start over")
        with torch.no_grad():
            for n, v in state["params"].items():
                self.params[n].copy_(v)
        self.opt.load_state_dict(state["optimizer"])
        self.g.set_state(state["generator"])  # as at the start of the interrupted epoch
        self.step, self.losses, self.batch, self.epoch = state["step"], state["losses"], state["batch"], state["epoch"]
        if self.validation is not None:
            self.validation.best, self.validation.history = state.get("best"), state.get("val_history", [])
        ranks = state.get("world_size", 1)
        moved = f" (written by {ranks} rank{'s' if ranks > 1 else ''})" if ranks != self.info.world_size else ""
        self.say(f"resuming recovery from {self.state_path} at step {self.step}/{self.steps}{moved}")

    def save(self, epoch_state: torch.Tensor) -> None:
        """The resume state, written atomically by rank 0 alone."""
        if not self.state_path or not self.info.is_main:
            return
        write_state(self.state_path, {
            "method": self.method, "steps": self.steps, "run": self.identity, "step": self.step,
            "losses": self.losses, "generator": epoch_state, "batch": self.batch, "epoch": self.epoch,
            "params": {n: p.detach().clone() for n, p in self.params.items()}, "optimizer": self.opt.state_dict(),
            "best": self.best, "val_history": self.val_history, "world_size": self.info.world_size})

    @property
    def best(self) -> Optional[Dict[str, Any]]:
        """The best validated parameters and their result (``None`` without validation)."""
        return self.validation.best if self.validation is not None else None

    @property
    def val_history(self) -> List[Dict[str, Any]]:
        """Every validation result so far."""
        return self.validation.history if self.validation is not None else []

    # -- one step --------------------------------------------------------------------------------

    def _teacher_logp(self, images: torch.Tensor) -> torch.Tensor:
        with self.amp(), torch.no_grad():
            t_logits = self.teacher(images)
        return (t_logits.float() / self.temperature).log_softmax(-1)

    def _micro_loss(self, images: torch.Tensor, labels: torch.Tensor, lam: Optional[float],
                    taps: Optional[ClassTokenTaps], indices: Optional[List[int]] = None,
                    flips: Optional[torch.Tensor] = None) -> torch.Tensor:
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if flips is not None:
            images = apply_flips(images, flips)
        if lam is not None:
            pair = partners(images.shape[0])
            images = lam * images + (1 - lam) * images[pair]
        if self.cache is not None:
            flip_side = flips if flips is not None else torch.zeros(len(indices), dtype=torch.bool)
            t_logp = self.cache.lookup(indices, flip_side, images, self._teacher_logp)
        else:
            t_logp = self._teacher_logp(images)
        with self.amp():
            s_logits = (self.ddp or self.student)(images)
        loss = distill_loss(s_logits, t_logp, self.temperature)
        if taps is not None:
            loss = loss + self.feature_weight * taps.loss()
        if self.use_ce:
            s = s_logits.float()
            ce = F.cross_entropy(s, labels) if lam is None else \
                lam * F.cross_entropy(s, labels) + (1 - lam) * F.cross_entropy(s, labels[partners(labels.shape[0])])
            loss = loss + self.ce_weight * ce
        return loss

    def _step(self, micro_batches: List, taps: Optional[ClassTokenTaps]) -> float:
        for group in self.opt.param_groups:
            group["lr"] = warmup_cosine(self.step, self.lr, self.warmup, self.steps)
        lam = mixup_lambda(self.mixup, self.seed, self.step) if self.mixup > 0 else None
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for i, (images, labels, *where) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
            with sync:
                loss = self._micro_loss(images, labels, lam, taps, *where) / len(micro_batches)
                loss.backward()
            total += float(loss.detach())
        self.opt.step()
        self.step += 1
        return _all_mean(total, self.info)

    def validate(self) -> None:
        """Evaluate on the validation images (if any), keeping the best parameters so far."""
        if self.validation is not None:
            self.validation(self.student, self.teacher, self.params, self.step, self.epoch)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> float:
        """Train to ``steps``; returns the wall time in seconds."""
        from tqdm import tqdm

        taps = self.taps = ClassTokenTaps(self.teacher, self.model) if self.feature_weight > 0 else None
        start = time.perf_counter()
        bar = tqdm(total=self.steps, initial=self.step, desc=f"recover ({self.method})", file=sys.stderr,
                   disable=not (self.progress and self.info.is_main), mininterval=2)
        self.student.train()
        self.teacher.eval()
        window: List[float] = []

        def after_step(loss: float, epoch_state: torch.Tensor, batch_after: int, epoch_done: bool) -> None:
            window.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", refresh=False)
            if self.step % self.save_every == 0 or self.step == self.steps or epoch_done:
                if window:
                    self.losses.append(sum(window) / len(window))
                    window.clear()
                if epoch_done:
                    self.epoch, self.batch = self.epoch + 1, 0
                    self.validate()
                    self.save(self.g.get_state())  # the epoch is done: resume at the next one
                else:
                    self.batch = batch_after
                    self.save(epoch_state)

        try:
            while self.step < self.steps:
                epoch_state = self.g.get_state()
                if self.streaming:
                    self._stream_epoch(epoch_state, after_step)
                else:
                    self._epoch(epoch_state, after_step)
            if self.validation is not None and (not self.val_history or self.val_history[-1]["step"] != self.step):
                self.validate()  # the run ended inside an epoch
                self.save(self.g.get_state())
            if self.validation is not None:
                self.validation.restore_best(self.params)
        finally:
            bar.close()
            for handle in self.hooks:
                handle.remove()  # also after an interruption: the user's models keep no hooks
            if taps is not None:
                taps.remove()
        if window:
            self.losses.append(sum(window) / len(window))
        return time.perf_counter() - start

    def _epoch(self, epoch_state: torch.Tensor, after_step) -> None:
        # The epoch's order comes from one draw, so a resume replays it exactly and skips what ran.
        order = torch.randperm(len(self.data), generator=self.g).tolist()
        batches = global_batches(order, self.batch_size)
        first = self.batch
        micro = rank_micro_batches(batches[first:], self.info.rank, self.info.world_size, self.accum)
        loader = DataLoader(SeededItems(self.data, self.seed, self.epoch), batch_sampler=micro,
                            num_workers=self.num_workers)
        flips = flip_draws(len(self.data), self.seed, self.epoch) if self.hflip else None
        pending: List = []
        index = first
        for indices, (images, labels) in zip(micro, loader):
            pending.append((images, labels, indices, flips[indices] if flips is not None else None))
            if len(pending) < self.accum:
                continue
            loss = self._step(pending, self.taps)
            pending = []
            index += 1
            after_step(loss, epoch_state, index, index == len(batches))
            if self.step >= self.steps:
                return

    def _stream_epoch(self, epoch_state: torch.Tensor, after_step) -> None:
        pending: List = []
        done_any = False
        for b, micro in stream_micro_batches(self.data, self.batch_size, self.info.rank, self.info.world_size,
                                             self.accum, self.batch, presplit=is_presplit(self.data)):
            pending.append(micro)
            if len(pending) < self.accum:
                continue
            loss = self._step(pending, self.taps)
            pending, done_any = [], True
            epoch_over = self.steps_per_epoch is not None and b + 1 == self.steps_per_epoch
            after_step(loss, epoch_state, b + 1, epoch_over)
            if self.step >= self.steps or epoch_over:
                return
        if not done_any:
            raise ValueError("the training stream yielded less than one global batch")
        self.epoch, self.batch = self.epoch + 1, 0  # the stream ended: its next pass is the next epoch


def warmup_cosine(step: int, lr: float, warmup: int, steps: int) -> float:
    """The learning rate at ``step``: linear warm-up over ``warmup`` steps to ``lr``, then cosine decay."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _autocast(precision: str, device: torch.device) -> Callable[[], Any]:
    """A context factory for the forward passes: bf16/fp16 autocast, or nothing for float32 (the
    loss and the update stay in float32 either way)."""
    from ..measure.benchmark import resolve_precision

    _, amp_dtype = resolve_precision(precision)
    if precision not in ("float32", "amp_bfloat16", "amp_float16"):
        raise ValueError(f"recovery trains in float32 weights: precision float32, amp_bfloat16 or amp_float16, "
                         f"not {precision}")
    return (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else nullcontext


def _classes(model: nn.Module) -> int:
    return getattr(model, "num_classes", 0) or 0
