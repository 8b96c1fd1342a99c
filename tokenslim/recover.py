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

The run is resumable: with ``state_path`` the trainable parameters, the optimizer and the step are
saved every ``save_every`` steps and at the end; calling again with the same arguments continues.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

METHODS = ("bias", "norm", "bias_norm", "lora", "lora_bias_norm", "full")
LORA_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|fc1_g|fc1_x))"
"""Exactly the attention and MLP Linear layers of timm blocks (a plain ``["proj"]`` would also catch
``patch_embed.proj``)."""


@dataclass
class RecoverResult:
    """What a recovery run did.

    Attributes:
        method: the tuning method.
        steps: optimizer steps taken in total (including steps of an interrupted earlier run).
        images: training images seen per epoch (the dataset size).
        losses: mean loss of each logged window, in order (for plots and checks).
        seconds: wall time of this call.
        trainable: number of parameters trained (LoRA: the adapter parameters).
    """

    method: str
    steps: int
    images: int
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    trainable: int = 0
    window: int = 50

    def loss_summary(self) -> str:
        """The loss at the start and the end, each the mean of one logged window (``window`` steps),
        or a plain mean when the run fits in one window and shows no trend."""
        if not self.losses:
            return "no steps taken"
        if len(self.losses) == 1:
            return f"mean loss {self.losses[0]:.4f} over {self.steps} steps (one window: no trend to show)"
        return (f"loss {self.losses[0]:.4f} (mean of the first {self.window} steps) -> {self.losses[-1]:.4f} "
                "(mean of the last window)")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__ in ("LayerNorm", "RmsNorm")


def trainable_parameters(model: nn.Module, method: str) -> Dict[str, nn.Parameter]:
    """The parameters ``method`` trains (``bias``/``norm``/``bias_norm``/``full``), by name."""
    if method not in ("bias", "norm", "bias_norm", "full"):
        raise ValueError(f"trainable_parameters covers bias, norm, bias_norm and full, not {method!r}")
    if method == "full":
        return dict(model.named_parameters())
    chosen: Dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if method in ("bias", "bias_norm") and isinstance(module, nn.Linear) and module.bias is not None \
                and name.startswith("blocks."):
            chosen[f"{name}.bias"] = module.bias
        if method in ("norm", "bias_norm") and _is_norm(module):
            for pname, p in module.named_parameters(recurse=False):
                chosen[f"{name}.{pname}"] = p
    return chosen


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError(
            "method='lora' needs Hugging Face peft, an optional extra: pip install 'tokenslim[peft]' "
            "(or pip install peft). The methods bias, norm and bias_norm need nothing extra."
        ) from None
    return peft


def _labels_fit(data: Dataset, num_classes: int) -> bool:
    from .evaluate import dataset_targets

    targets = dataset_targets(data)
    return targets is not None and all(0 <= t < num_classes for t in targets)


def recover(
    model: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    method: str = "bias_norm",
    steps: int = 300,
    lr: Optional[float] = None,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    ce_weight: float = 0.0,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    mixup: float = 0.0,
    feature_weight: float = 0.0,
    temperature: float = 1.0,
    num_workers: int = 0,
    seed: int = 0,
    state_path: Optional[str] = None,
    save_every: int = 50,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    run_info: Optional[Dict[str, Any]] = None,
) -> RecoverResult:
    """Distil the unpatched ``teacher`` into the reduced ``model`` by tuning a few parameters.

    Args:
        model: the reduced model (patched and/or channel-pruned); trained in place.
        teacher: the unpatched model; its outputs must have the model's shape.
        data: training images ``(image, label)`` with the evaluation transform (or light augmentation).
        method: ``"bias"``, ``"norm"``, ``"bias_norm"``, ``"lora"``, ``"lora_bias_norm"`` or ``"full"``.
        steps: optimizer steps (cycling over ``data``).
        lr: peak learning rate (cosine decay after 5% warm-up); default 1e-3 (bias/norm), 5e-4 (LoRA),
            1e-4 (full).
        ce_weight: weight of cross-entropy on the labels, added to the KL when the labels fit.
        mixup: with ``mixup > 0`` every batch is blended with itself reversed, ``lam * x + (1 - lam) *
            x.flip(0)`` with ``lam ~ Beta(mixup, mixup)``; teacher and student see the same blend
            ("function matching": the student is matched on inputs between the images, so a few
            thousand images go much further). Cross-entropy, if on, is blended the same way.
        feature_weight: with ``feature_weight > 0`` (class-token models) the class token of the
            residual stream entering every block and the final norm is matched as well: the
            squared error relative to the teacher's norm, averaged over blocks, times this weight:
            more signal per image than the logits alone.
        temperature: distillation temperature ``T``: both output distributions are softened by
            ``T`` and the KL is scaled by ``T**2`` (Hinton et al.), so the teacher's ranking of the
            wrong classes, not only its top class, is matched. 1.0 is the plain KL.
        state_path: resume file, written every ``save_every`` steps and at the end. A rerun resumes
            it only when it is the same run (:func:`tokenslim.fingerprint.fingerprint`): the same
            teacher and starting weights (by content), reduction, data (items, picks and transform)
            and options; anything else is refused before training, naming what differs.
        run_info: further JSON values that identify the run in the resume check (the CLI passes
            the settings text, the model name and ``augment``).
        progress: a tqdm bar with the running loss (on a terminal).

    Returns:
        A :class:`RecoverResult`. ``model`` holds the folded-back weights afterwards.

    Raises:
        ValueError: an unknown method, teacher outputs of another shape, bad step counts.
        ImportError: a LoRA method without ``peft`` (naming the extra to install).
    """
    if method not in METHODS:
        raise ValueError(f"unknown recovery method {method!r}; known: {', '.join(METHODS)}")
    if steps < 1 or batch_size < 1 or save_every < 1:
        raise ValueError("steps, batch_size and save_every must be >= 1")
    if not mixup >= 0:
        raise ValueError(f"mixup is the Beta parameter of the blend and must be >= 0 (0: off), got {mixup}")
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
    uses_lora = method.startswith("lora")
    if uses_lora:
        _require_peft()
    if len(data) == 0:
        raise ValueError("the training data is empty")
    lr = lr if lr is not None else (5e-4 if uses_lora else 1e-4 if method == "full" else 1e-3)
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    names_before = {n: tuple(p.shape) for n, p in model.state_dict().items()}

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    probe = data[0][0].unsqueeze(0)
    with torch.no_grad():
        t_out, s_out = teacher(probe), model.eval()(probe)
    if t_out.shape != s_out.shape:
        raise ValueError(f"the teacher's outputs have shape {tuple(t_out.shape[1:])}, the model's "
                         f"{tuple(s_out.shape[1:])}: distillation needs the same classes")
    use_ce = ce_weight > 0 and _labels_fit(data, s_out.shape[-1])

    # What a resumed run must share with the interrupted one, or the result mixes two runs: weights
    # by content (before any adapter is attached), the reduction, the data and every option.
    from .fingerprint import fingerprint, weights_digest

    reduction = getattr(model, "tokenslim", None)
    identity = fingerprint(
        model, data, teacher=weights_digest(teacher), method=method, steps=steps,
        reduction=reduction.as_dict() if hasattr(reduction, "as_dict") else None,
        lr=lr, batch_size=batch_size, weight_decay=weight_decay, ce_weight=ce_weight, mixup=mixup,
        feature_weight=feature_weight, temperature=temperature, seed=seed, lora_rank=lora_rank if uses_lora else None,
        lora_alpha=lora_alpha if uses_lora else None, **(run_info or {}))

    for p in model.parameters():
        p.requires_grad_(False)
    student = model
    if uses_lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=LORA_TARGETS, lora_dropout=0.0,
                            bias="none")
        student = get_peft_model(model, config)
        if method == "lora_bias_norm":
            # The wrapped layers keep their own bias and norm Parameters: train them in place.
            for p in trainable_parameters(model, "bias_norm").values():
                p.requires_grad_(True)
        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    else:
        params = trainable_parameters(model, method)
        for p in params.values():
            p.requires_grad_(True)
    if not params:
        raise ValueError(f"method {method!r} found nothing to train in this model")
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    if state_path:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(state_path)), exist_ok=True)
            with open(state_path + ".tmp", "ab"):
                pass  # written for real every save_every steps: find out now, not after them
            os.remove(state_path + ".tmp")
        except OSError as e:
            raise ValueError(f"the recovery state {state_path} cannot be written ({e.strerror or e}); pass another "
                             "state path (--state)") from None
    g = torch.Generator().manual_seed(seed)
    step, losses, resume_batch, epoch = 0, [], 0, 0
    if state_path and os.path.isfile(state_path):
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise ValueError(f"the recovery state {state_path} cannot be read ({type(e).__name__}); delete it to "
                             "start over") from None
        from .fingerprint import check_same_run

        check_same_run(state.get("run"), identity, f"the recovery state {state_path}",
                       "Resume with the same command, or delete the file to start over")
        if set(state["params"]) != set(params):
            raise ValueError(f"{state_path} trains other parameters than this run; delete it to start over")
        with torch.no_grad():
            for n, v in state["params"].items():
                params[n].copy_(v)
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])  # as at the start of the interrupted epoch
        step, losses, resume_batch, epoch = state["step"], state["losses"], state["batch"], state["epoch"]
        say(f"resuming recovery from {state_path} at step {step}/{steps}")

    def save(epoch_state: torch.Tensor, batch: int, epoch_index: int) -> None:
        if not state_path:
            return
        tmp = state_path + ".tmp"
        try:
            torch.save({"method": method, "steps": steps, "run": identity, "step": step, "losses": losses,
                        "generator": epoch_state, "batch": batch, "epoch": epoch_index,
                        "params": {n: p.detach().clone() for n, p in params.items()},
                        "optimizer": opt.state_dict()}, tmp)
            os.replace(tmp, state_path)
        except OSError as e:
            raise ValueError(f"cannot write the recovery state {state_path}: {e.strerror or e}") from None

    taps = _ClassTokenTaps(teacher, model) if feature_weight > 0 else None

    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(total=steps, initial=step, desc=f"recover ({method})", disable=not progress, file=sys.stderr,
               mininterval=2)
    student.train()
    teacher.eval()
    window: List[float] = []
    try:
        while step < steps:
            # The epoch's order comes from one draw, so a resume replays it exactly and skips what ran.
            epoch_state = g.get_state()
            order = torch.randperm(len(data), generator=g).tolist()
            usable = len(order) - (len(order) % batch_size if len(order) > batch_size else 0)
            batches = [order[i:i + batch_size] for i in range(0, usable, batch_size)]
            first, resume_batch = resume_batch, 0
            items = _SeededItems(data, seed, epoch)  # random augmentation drawn per image: resumable
            loader = DataLoader(items, batch_sampler=batches[first:], num_workers=num_workers)
            for batch_index, (images, labels) in enumerate(loader, first + 1):
                if step >= steps:
                    break
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
                lam = None
                if mixup > 0:
                    # Seeded by the step, so a resumed run draws what the uninterrupted one would.
                    lam = _beta(mixup, torch.Generator().manual_seed(seed * 1_000_003 + step))
                    images = lam * images + (1 - lam) * images.flip(0)
                with torch.no_grad():
                    t_logp = (teacher(images).float() / temperature).log_softmax(-1)
                s_logits = student(images).float()
                loss = temperature ** 2 * F.kl_div((s_logits / temperature).log_softmax(-1), t_logp, log_target=True,
                                                   reduction="batchmean")
                if taps is not None:
                    loss = loss + feature_weight * taps.loss()
                if use_ce:
                    ce = F.cross_entropy(s_logits, labels) if lam is None else \
                        lam * F.cross_entropy(s_logits, labels) + (1 - lam) * F.cross_entropy(s_logits, labels.flip(0))
                    loss = loss + ce_weight * ce
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                window.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", refresh=False)
                if step % save_every == 0 or step == steps:
                    losses.append(sum(window) / len(window))
                    window = []
                    if batch_index < len(batches):
                        save(epoch_state, batch_index, epoch)
                    else:
                        save(g.get_state(), 0, epoch + 1)  # the epoch is done: resume at the next one
            epoch += 1
    finally:
        bar.close()
        if taps is not None:
            taps.remove()  # also after an interruption: the user's models keep no hooks
    if window:
        losses.append(sum(window) / len(window))
    if uses_lora:
        merged = student.merge_and_unload()
        if merged is not model:
            model.load_state_dict(merged.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    after = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if after != names_before:
        extra = sorted(set(after) - set(names_before))[:3]
        raise RuntimeError(f"recovery changed the model's parameters (e.g. {extra}); please report this")
    trainable = sum(p.numel() for p in params.values())
    return RecoverResult(method, step, len(data), losses, time.perf_counter() - start, trainable, save_every)


class _SeededItems(Dataset):
    """``data`` with each item's random transform drawn from a seed of its own (run seed, epoch,
    index): two identical runs see identical augmented images, a resumed run sees what the
    uninterrupted one would have, whatever the worker count. The caller's random state is kept."""

    def __init__(self, data: Dataset, seed: int, epoch: int) -> None:
        self.data, self.seed, self.epoch = data, seed, epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        import random

        item_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        saved = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)  # timm's random-resized crop draws from Python's generator
                return self.data[index]
        finally:
            random.setstate(saved)


class _ClassTokenTaps:
    """Forward hooks that keep the class token of the residual stream where it enters each
    block's first norm and the final norm, for teacher and student alike (a reduced block keeps
    the class token first, so index 0 is the same token in both)."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        self.seen: Dict[str, List[torch.Tensor]] = {"teacher": [], "student": []}
        self.handles = []
        for role, model in (("teacher", teacher), ("student", student)):
            norms = [block.norm1 for block in model.blocks[1:]] + [model.norm]
            for norm in norms:
                self.handles.append(norm.register_forward_hook(self._keep(role)))

    def _keep(self, role: str):
        def hook(module, inputs, output):
            self.seen[role].append(inputs[0][:, 0].float())
        return hook

    def loss(self) -> torch.Tensor:
        t, s = self.seen["teacher"], self.seen["student"]
        if len(t) != len(s) or not t:
            raise RuntimeError(f"class-token taps saw {len(t)} teacher and {len(s)} student blocks")
        total = sum(((si - ti.detach()) ** 2).sum(-1).mean() / (ti.detach() ** 2).sum(-1).mean().clamp_min(1e-12)
                    for si, ti in zip(s, t)) / len(t)
        self.seen = {"teacher": [], "student": []}
        return total

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _beta(alpha: float, g: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from ``g`` by Johnk's method (uniforms only, so the draw
    depends on ``g`` alone; torch.distributions would draw from the global generator)."""
    u = torch.rand(2, generator=g, dtype=torch.float64)
    while True:
        x, y = u[0].item() ** (1.0 / alpha), u[1].item() ** (1.0 / alpha)
        if x + y <= 1.0 and x + y > 0.0:
            return x / (x + y)
        u = torch.rand(2, generator=g, dtype=torch.float64)


def lora_target_names(model: nn.Module) -> List[str]:
    """Names of the modules ``method="lora"`` adapts (for checking the pattern on a model)."""
    pattern = re.compile(LORA_TARGETS + r"$")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]


__all__ = ["LORA_TARGETS", "METHODS", "RecoverResult", "lora_target_names", "recover", "trainable_parameters"]
