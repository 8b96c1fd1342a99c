"""``tokenslim.recover``: win back the accuracy a reduction costs with short parameter-efficient
distillation from the unpatched model, folded back into the weights.

Training runs with the reduction active (merging, pruning, materialised channels): the student is
the reduced model itself, the teacher the unpatched model. The loss is KL(teacher || student) on
the outputs, so no labels are needed; with ``ce_weight > 0`` and labels that fit the head,
cross-entropy is added. A few parameters train (all of them with ``"full"``, the reference):

* ``"bias"``: the biases of every Linear in the blocks ("offset" tuning);
* ``"norm"``: the LayerNorm weights and biases (blocks and final norm);
* ``"bias_norm"``: both (the default: no extra dependency, a few minutes on a CPU);
* ``"lora"``: LoRA on the attention and MLP Linear layers through Hugging Face ``peft``
  (``pip install 'tokenslim[peft]'``), merged back with ``merge_and_unload()``;
* ``"lora_bias_norm"``: LoRA and the ``bias_norm`` parameters together;
* ``"full"``: every parameter (plain fine-tuning: the reference the parameter-efficient methods
  are measured against; the largest optimizer state and checkpoint, nothing to fold back).

All of them fold back: the recovered model has the same parameter names and shapes as before
(plus nothing), the same architecture and therefore the same speed, and keeps its settings and
channel plan, so :func:`tokenslim.loading.save_checkpoint` / ``tokenslim eval --checkpoint``
reproduce its accuracy.

Whole training sets, on one machine or many: ``epochs`` instead of ``steps``, an optional
validation set evaluated after every epoch (the best epoch is kept), bf16 autocast, gradient
accumulation, and ``torchrun``: the same call under ``torchrun --nproc_per_node N`` (or a user's
script launched by torchrun) joins the process group, trains with DistributedDataParallel (gloo on
CPU, nccl on GPU), each rank reading an even share of every global batch; rank 0 alone writes the
state. ``batch_size`` is the global batch on any number of ranks, so N ranks take the steps one
process would, and a state written on N ranks resumes on M.

The run is resumable: with ``state_path`` the trainable parameters, the optimizer and the position
are saved every ``save_every`` steps and after every epoch; calling again with the same run (the
fingerprint of :mod:`tokenslim.fingerprint`) continues.

Modules: :mod:`~tokenslim.recover.params` (what trains, LoRA, folding back),
:mod:`~tokenslim.recover.losses` (the objective), :mod:`~tokenslim.recover.data` (orders, shares,
streams), :mod:`~tokenslim.recover.teacher_cache` (the teacher's outputs kept per image, the seeded
flip) and :mod:`~tokenslim.recover.trainer` (the loop).
"""
from __future__ import annotations

import math

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from .losses import beta as _beta  # noqa: F401  (kept under its old name)
from .params import LORA_TARGETS, METHODS, _require_peft, lora_target_names, trainable_parameters  # noqa: F401
from .params import fold_back
from .trainer import Trainer


@dataclass
class RecoverResult:
    """What a recovery run did.

    Attributes:
        method: the tuning method.
        steps: optimizer steps taken in total (including steps of an interrupted earlier run).
        images: training images per epoch (``None`` for a stream of unknown length).
        losses: mean loss of each logged window, in order (for plots and checks).
        seconds: wall time of this call.
        trainable: number of parameters trained (LoRA: the adapter parameters).
        window: steps per logged window.
        epochs: epochs completed.
        world_size: ranks that trained in this call.
        batch_size: the global batch.
        val_history: one entry per validation (epoch, step, top1, kl, agreement).
        best: the validation entry whose parameters were kept (``None`` without validation).
    """

    method: str
    steps: int
    images: Optional[int]
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable: int = 0
    window: int = 50
    epochs: int = 0
    world_size: int = 1
    batch_size: int = 0
    val_history: List[Dict[str, Any]] = field(default_factory=list)
    best: Optional[Dict[str, Any]] = None

    def loss_summary(self) -> str:
        """The loss at the start and the end, each the mean of one logged window (``window`` steps),
        or a plain mean when the run fits in one window and shows no trend."""
        if not self.losses:
            return "no steps taken"
        if len(self.losses) == 1:
            return f"mean loss {self.losses[0]:.4f} over {self.steps} steps (one window: no trend to show)"
        return (f"loss {self.losses[0]:.4f} (mean of the first {self.window} steps) -> {self.losses[-1]:.4f} "
                "(mean of the last window)")


def recover(model: nn.Module, teacher: nn.Module, data: Dataset, method: str = "bias_norm",
            steps: Optional[int] = 300, lr: Optional[float] = None, batch_size: int = 64, weight_decay: float = 0.0,
            ce_weight: float = 0.0, lora_rank: int = 8, lora_alpha: int = 16, mixup: float = 0.0,
            feature_weight: float = 0.0, temperature: float = 1.0, num_workers: int = 0, seed: int = 0,
            state_path: Optional[str] = None, save_every: int = 50, progress: bool = True,
            log: Optional[Callable[[str], None]] = None, run_info: Optional[Dict[str, Any]] = None,
            epochs: Optional[float] = None, accum: int = 1, precision: str = "float32",
            val_data: Optional[Dataset] = None, device: Optional[str] = None, cache_teacher: bool = False,
            hflip: bool = False) -> RecoverResult:
    """Distil the unpatched ``teacher`` into the reduced ``model`` by tuning a few parameters.

    Args:
        model: the reduced model (patched and/or channel-pruned); trained in place.
        teacher: the unpatched model; its outputs must have the model's shape.
        data: training images ``(image, label)`` with the evaluation transform (or light
            augmentation); a map-style data set, or an ``IterableDataset`` stream (read in its own
            order, each rank taking its share of every global batch).
        method: ``"bias"``, ``"norm"``, ``"bias_norm"``, ``"lora"``, ``"lora_bias_norm"`` or ``"full"``.
        steps: optimizer steps (cycling over ``data``); ``None`` with ``epochs``.
        epochs: instead of ``steps``: passes over ``data`` (fractions allowed; a last partial
            global batch of each epoch is dropped).
        lr: peak learning rate (cosine decay after 5% warm-up); default 1e-3 (bias/norm), 5e-4 (LoRA),
            1e-4 (full, merge: a learned merge policy went worse at 1e-3).
        batch_size: the global batch: images per optimizer step over all ranks and accumulation
            steps (each rank takes an even share).
        accum: gradient accumulation: each rank's share is split into this many forward/backward
            passes before one update (less memory, the same step).
        precision: ``"float32"``, or ``"amp_bfloat16"``/``"amp_float16"`` autocast for the forward
            passes (weights, loss and update stay in float32).
        ce_weight: weight of cross-entropy on the labels, added to the KL when the labels fit.
        mixup: with ``mixup > 0`` every batch is blended with itself, neighbours swapped in pairs,
            ``lam * x + (1 - lam) * x[pair]`` with ``lam ~ Beta(mixup, mixup)`` drawn per step;
            teacher and student see the same blend ("function matching").
        feature_weight: with ``feature_weight > 0`` (class-token models) the class token of the
            residual stream entering every block and the final norm is matched as well (squared
            error relative to the teacher's norm, averaged over blocks) with this weight.
        temperature: distillation temperature ``T``: both outputs softened by ``T``, the KL scaled
            by ``T**2`` (Hinton et al.). 1.0 is the plain KL.
        hflip: mirror a seeded half of the images left to right, drawn anew every epoch (the same
            on every rank and after a resume); the flip that ``cache_teacher`` can cache.
        cache_teacher: keep the teacher's output for every image (and its flip) the first time it
            is computed and reuse it in later epochs: the same loss, the teacher's forward pass
            paid once. For inputs that are the same every epoch (the evaluation transform, with
            ``hflip``); refused with ``mixup`` or ``feature_weight`` and for streams. Memory:
            images x 2 x classes x 4 bytes, stated in the first log line.
        val_data: images evaluated after every epoch (top-1 and KL to the teacher); the parameters
            of the best epoch (top-1 where labels fit, else KL) are the ones kept.
        state_path: resume file, written every ``save_every`` steps and after every epoch (rank 0).
            A rerun resumes it only when it is the same run (:func:`tokenslim.fingerprint.fingerprint`:
            teacher and starting weights by content, reduction, data, options), on any number of ranks;
            anything else is refused before training, naming what differs.
        run_info: further JSON values that identify the run in the resume check.
        device: defaults to this rank's GPU when CUDA is available, else the CPU.
        progress: a tqdm bar with the running loss (on a terminal, rank 0).

    Under ``torchrun`` the call joins the process group described by the environment (or uses the
    one already there) and trains with DistributedDataParallel.

    Returns:
        A :class:`RecoverResult`. ``model`` holds the folded-back weights afterwards.

    Raises:
        ValueError: an unknown method, teacher outputs of another shape, bad step counts, a data set
            smaller than one global batch, a global batch that does not split over the ranks.
        ImportError: a LoRA method without ``peft`` (naming the extra to install).
    """
    from ..ranks import init_from_env

    steps = _check_arguments(model, method, steps, epochs, batch_size, save_every, accum, mixup, lr, ce_weight,
                             lora_rank, temperature, feature_weight)
    _prepare_method(model, method)
    streaming = isinstance(data, IterableDataset)
    _check_data(model, data, val_data, ce_weight, streaming)
    info = init_from_env()
    if info.is_main:
        _check_state_path(state_path)  # rank 0 alone writes it
    lr = lr if lr is not None else (5e-4 if method.startswith("lora") else 1e-4 if method in ("full", "merge") else 1e-3)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    names_before = {n: tuple(p.shape) for n, p in model.state_dict().items()}

    t_out = _freeze_and_probe(teacher, model, data, streaming)

    identity = _identity(model, teacher, None if streaming else data, method=method, steps=steps, epochs=epochs, lr=lr,
                         batch_size=batch_size, weight_decay=weight_decay, ce_weight=ce_weight, mixup=mixup,
                         feature_weight=feature_weight, temperature=temperature, seed=seed, precision=precision,
                         lora_rank=lora_rank if method.startswith("lora") else None,
                         lora_alpha=lora_alpha if method.startswith("lora") else None,
                         stream=type(data).__name__ if streaming else None, hflip=hflip, **(run_info or {}))
    trainer = Trainer(model, teacher, data, method=method, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size,
                      accum=accum, weight_decay=weight_decay, ce_weight=ce_weight, lora_rank=lora_rank,
                      lora_alpha=lora_alpha, mixup=mixup, feature_weight=feature_weight, temperature=temperature,
                      precision=precision, num_workers=num_workers, seed=seed, state_path=state_path,
                      save_every=save_every, val_data=val_data, progress=progress, say=say, identity=identity,
                      device=device, cache_teacher=cache_teacher, hflip=hflip)
    _announce(trainer, t_out.shape[-1])
    trainer.resume()
    seconds = trainer.run()
    return _finish(model, trainer, names_before, seconds)


def _prepare_method(model: nn.Module, method: str) -> None:
    """What a method needs before training: ``peft`` for LoRA, a merge policy to train for ``merge``."""
    if method.startswith("lora"):
        _require_peft()
    if method == "merge":
        prepare_merge_training(model)


def _check_data(model: nn.Module, data: Dataset, val_data: Optional[Dataset], ce_weight: float,
                streaming: bool) -> None:
    """Refuse empty data, and class folders that do not match the model's classes where labels are used."""
    if not streaming and len(data) == 0:
        raise ValueError("the training data is empty")
    from ..evaluate.data import match_classes

    if ce_weight > 0 and not streaming:
        match_classes(data, model, "the training data")  # cross-entropy must not learn wrong labels
    if val_data is not None:
        match_classes(val_data, model, "the validation data")


def _identity(model: nn.Module, teacher: nn.Module, data: Optional[Dataset], /, **options: Any) -> Dict[str, Any]:
    """The run's fingerprint for the resume check."""
    # What a resumed run must share with the interrupted one, or the result mixes two runs: weights
    # by content (before any adapter is attached), the reduction, the data and every option. Not
    # the number of ranks or the accumulation: they do not change the step.
    from ..fingerprint import fingerprint, weights_digest

    reduction = getattr(model, "tokenslim", None)
    return fingerprint(model, data, teacher=weights_digest(teacher),
                       reduction=reduction.as_dict() if hasattr(reduction, "as_dict") else None, **options)


def _announce(trainer: Trainer, classes: int) -> None:
    """The first log lines: ranks, batch split, steps, learning rate, device, the teacher cache's size."""
    world_size = trainer.info.world_size
    plural = "s" if world_size > 1 else ""
    share = f"{trainer.micro} per rank x {world_size} rank{plural}" + \
        (f" x {trainer.accum} accumulation steps" if trainer.accum > 1 else "")
    per_epoch = f", {trainer.steps_per_epoch} steps per epoch" if trainer.steps_per_epoch else ""
    trainer.say(f"recover: {world_size} rank{plural} train {trainer.method}, global batch {trainer.batch_size} "
                f"({share}), {trainer.steps} steps{per_epoch}, lr {trainer.lr:g}, {trainer.device.type}")
    if trainer.cache is not None:
        from .teacher_cache import TeacherCache

        size = TeacherCache.nbytes(trainer.images, classes) / 2 ** 20
        trainer.say(f"recover: the teacher's outputs are cached ({trainer.images} images x 2 flips x "
                    f"{classes} classes, {size:.1f} MB), computed once each")


def _finish(model: nn.Module, trainer: Trainer, names_before: Dict[str, Any], seconds: float) -> RecoverResult:
    """Fold the trained parameters back into ``model`` (its state_dict keys and shapes unchanged) and report."""
    fold_back(model, trainer.student)
    after = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if after != names_before:
        extra = sorted(set(after) - set(names_before))[:3]
        raise RuntimeError(f"recovery changed the model's parameters (e.g. {extra}); please report this")
    trainable = sum(p.numel() for p in trainer.params.values())
    return RecoverResult(trainer.method, trainer.step, trainer.images, trainer.losses, seconds, trainable,
                         trainer.save_every, trainer.epoch, trainer.info.world_size, trainer.batch_size,
                         trainer.val_history,
                         trainer.best["entry"] if trainer.best else None)


def _check_arguments(model: nn.Module, method: str, steps: Optional[int], epochs: Optional[float], batch_size: int,
                     save_every: int, accum: int, mixup: float, lr: Optional[float], ce_weight: float,
                     lora_rank: int, temperature: float, feature_weight: float) -> Optional[int]:
    """Refuse bad options before anything runs, naming the argument; returns ``steps`` (``None``
    when ``epochs`` rules)."""
    if method not in METHODS:
        raise ValueError(f"unknown recovery method {method!r}; known: {', '.join(METHODS)}")
    if (steps is None) == (epochs is None) and not (epochs is not None and steps == 300):
        raise ValueError("give steps or epochs, not both")
    if epochs is not None:
        steps = None
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
    if (steps is not None and steps < 1) or batch_size < 1 or save_every < 1 or accum < 1:
        raise ValueError("steps, batch_size, save_every and accum must be >= 1")
    if not mixup >= 0:
        raise ValueError(f"mixup is the Beta parameter of the blend and must be >= 0 (0: off), got {mixup}")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive learning rate, got {lr}")
    if not ce_weight >= 0:
        raise ValueError(f"ce_weight must be >= 0 (0: distillation alone), got {ce_weight}")
    if method.startswith("lora") and not (isinstance(lora_rank, int) and lora_rank >= 1):
        raise ValueError(f"lora_rank must be a whole number >= 1, got {lora_rank}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (1.0: the plain KL), got {temperature}")
    if not feature_weight >= 0:
        raise ValueError(f"feature_weight must be >= 0 (0: off), got {feature_weight}")
    if feature_weight > 0 and getattr(model, "cls_token", None) is None:
        raise ValueError("feature_weight matches the class token between blocks and needs a model with one "
                         f"({type(model).__name__} has no cls_token); use feature_weight=0")
    return steps


def _freeze_and_probe(teacher: nn.Module, model: nn.Module, data, streaming: bool) -> torch.Tensor:
    """Freeze the teacher and check on one image that it and the model give outputs of one shape."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    probe = (next(iter(data)) if streaming else data[0])[0].unsqueeze(0)
    with torch.no_grad():
        t_out, s_out = teacher(probe), model.eval()(probe)
    if t_out.shape != s_out.shape:
        raise ValueError(f"the teacher's outputs have shape {tuple(t_out.shape[1:])}, the model's "
                         f"{tuple(s_out.shape[1:])}: distillation needs the same classes")
    return t_out


def prepare_merge_training(model: nn.Module) -> None:
    """Make a patched merging model ready to train its merge policy (``method="merge"``): a zero
    policy is attached if it has none (ToMe exactly) and ``method="tome"`` becomes ``"learned"``.

    Raises:
        ValueError: the model is not a patched timm ViT / Eva that merges with ToMe's matching.
    """
    from ..merge_policy import attach_policy

    reduction = getattr(model, "tokenslim", None)
    if reduction is None or not hasattr(model, "blocks"):
        raise ValueError("method='merge' trains a merge policy: patch a timm ViT or Eva model with a merging setting "
                         "first (e.g. tokenslim.patch(model, r=12)); with the CLI, --trainable merge --settings r=12")
    if not any(reduction.r_schedule):
        raise ValueError("method='merge' trains which tokens merge, and the setting merges none; give a merging "
                         "setting (--settings r=12 or r=(10,-1))")
    if reduction.method not in ("tome", "learned"):
        raise ValueError(f"method='merge' learns ToMe's matching metric; the setting uses method={reduction.method!r}. "
                         "Use method=tome (it becomes method=learned) or method=learned")
    attach_policy(model)
    reduction.method = "learned"


def _check_state_path(state_path: Optional[str]) -> None:
    """A state file that cannot be written is found now, not after ``save_every`` steps."""
    if not state_path:
        return
    import os

    try:
        os.makedirs(os.path.dirname(os.path.abspath(state_path)), exist_ok=True)
        with open(state_path + ".tmp", "ab"):
            pass
        os.remove(state_path + ".tmp")
    except OSError as e:
        raise ValueError(f"the recovery state {state_path} cannot be written ({e.strerror or e}); pass another "
                         "state path (--state)") from None


__all__ = ["LORA_TARGETS", "METHODS", "RecoverResult", "lora_target_names", "recover", "trainable_parameters"]
