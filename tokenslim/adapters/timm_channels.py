"""Channel pruning of timm ViTs: importance-ranked head and MLP-channel masks, and materialisation.

Workflow::

    plan = tokenslim.prune_channels(model, heads_pruned=1/3, mlp_pruned=0.5)   # masked: exact, not faster
    tokenslim.materialize(model)                                                 # smaller Linear layers: faster

Masks keep the embedding width and ``head_dim`` (pretrained norms, position embeddings, head and
attention scale stay valid) and remove whole heads and MLP hidden channels. A mask is applied by
zeroing the input of ``attn.proj`` (per head) and of ``mlp.fc2`` (per channel) through a forward
pre-hook, so the masked model computes what the smaller model computes; masked heads also leave
the merging metric and the class-attention score of token reduction. Mask buffers are
non-persistent: ``state_dict`` keys do not change.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers.mlp import GluMlp, Mlp, SwiGLU
from torch import nn

from ..ops.masks import kept_channels, kept_heads, top_mask
from .calls import base_class
from .timm_vit import HEAD_MASK_BUFFER as HEAD_BUFFER
from .registry import adapter_for
from .timm_vit import _check_supported as _check_timm_vit


def _check_supported(model: nn.Module) -> None:
    """Channel pruning rewrites timm's fused ``qkv`` and MLP layers: refuse other frameworks clearly.

    timm's rotary ``Eva`` family takes MLP channel pruning (its MLPs are timm's ``Mlp``, ``GluMlp``
    and ``SwiGLU``); its heads are refused by :func:`_check_block`."""
    adapter = adapter_for(model).__name__.rsplit(".", 1)[-1]
    if adapter == "timm_eva":
        from .timm_eva import _check_supported as _check_eva

        _check_eva(model)
        return
    if adapter != "timm_vit":
        framework = {"hf_vit": "a Hugging Face transformers", "open_clip_vit": "an open_clip"}.get(adapter, adapter)
        raise TypeError(
            f"channel pruning (heads_pruned / mlp_pruned / materialize) supports timm ViTs only; "
            f"{type(model).__name__} is {framework} model. Token reduction (tokenslim.patch) works on it; "
            "for channel pruning, load the same weights into the matching timm model"
        )
    _check_timm_vit(model)

CRITERIA = ("l1", "l2", "activation", "taylor")
Ratio = Union[float, Sequence[float]]
MASK_BUFFER = "tokenslim_in_mask"


@dataclass
class BlockChannels:
    """Kept head and MLP-channel indices of one block (indices into the original layers)."""

    heads: List[int]
    mlp: List[int]
    num_heads: int
    hidden: int


@dataclass
class ChannelPlan:
    """Kept indices of every block; serialisable, so a pruned model can be rebuilt for loading."""

    blocks: List[BlockChannels]
    criterion: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChannelPlan":
        return cls([BlockChannels(**b) for b in d["blocks"]], d.get("criterion", ""), dict(d.get("extra", {})))

    @property
    def prunes(self) -> bool:
        return any(len(b.heads) < b.num_heads or len(b.mlp) < b.hidden for b in self.blocks)


# ---------------------------------------------------------------------------------------------
# Structure of supported blocks
# ---------------------------------------------------------------------------------------------

def _hidden(mlp: nn.Module) -> int:
    return mlp.fc2.in_features


def _fc1_rows(mlp: nn.Module) -> List[nn.Linear]:
    """Linear layers whose output rows are the hidden channels (both halves for gated MLPs)."""
    return [mlp.fc1_g, mlp.fc1_x] if isinstance(mlp, SwiGLU) else [mlp.fc1]


def _is_eva_block(block: nn.Module) -> bool:
    return base_class(type(block)).__module__ == "timm.models.eva"


def mlp_prunable(model: nn.Module) -> bool:
    """Whether every block's MLP can lose hidden channels (``mlp_pruned``) exactly."""
    try:
        _check_supported(model)
        for i, block in enumerate(model.blocks):
            _check_block(i, block, False, True)
    except (TypeError, ValueError):
        return False
    return True


def _check_block(i: int, block: nn.Module, heads: bool, mlp: bool) -> None:
    attn = block.attn
    if heads and _is_eva_block(block):
        raise ValueError(f"block {i}: head pruning is not supported on timm Eva models (rotary attention with "
                         "q/v biases or grouped keys); prune MLP channels only (heads_pruned=0)")
    if heads and not isinstance(attn.norm, nn.Identity):
        raise ValueError(
            f"block {i}: the attention has a norm over its output (scale_norm); it normalises over all heads, so "
            "masking heads is not the same as removing them. Prune MLP channels only (heads_pruned=0)."
        )
    m = block.mlp
    if mlp:
        if type(m) not in (Mlp, GluMlp, SwiGLU):
            raise ValueError(f"block {i}: MLP type {type(m).__name__} is not supported for channel pruning "
                             "(supported: Mlp, GluMlp/SwiGLUPacked, SwiGLU)")
        if not isinstance(m.norm, nn.Identity):
            raise ValueError(
                f"block {i}: the MLP has a norm over its hidden channels (scale_mlp_norm); masking channels is not "
                "the same as removing them. Prune heads only (mlp_pruned=0)."
            )
        if not all(isinstance(fc, nn.Linear) for fc in _fc1_rows(m) + [m.fc2]):
            raise ValueError(f"block {i}: the MLP uses convolutions; only Linear MLPs can be pruned")
        if isinstance(m, GluMlp) and m.chunk_dim != -1:
            raise ValueError(f"block {i}: gated MLP with chunk_dim={m.chunk_dim} is not supported")


def _per_block(ratio: Ratio, depth: int, name: str) -> List[float]:
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool):
        return [float(ratio)] * depth
    if isinstance(ratio, Sequence) and not isinstance(ratio, (str, bytes)):
        if len(ratio) != depth:
            raise ValueError(f"{name} lists {len(ratio)} ratios for {depth} blocks")
        return list(ratio)
    raise TypeError(f"{name} must be a number in [0, 1) or one per block, got {type(ratio).__name__}")


# ---------------------------------------------------------------------------------------------
# Importance
# ---------------------------------------------------------------------------------------------

def _weight_groups(block: nn.Module) -> Tuple[List[Tuple[torch.Tensor, int, str]], List[Tuple[torch.Tensor, int, str]]]:
    """(tensor, dim, layout) triples whose slices along ``dim`` belong to each head / hidden channel."""
    attn, mlp = block.attn, block.mlp
    if _is_eva_block(block):
        heads = []  # not pruned there (see _check_block), and q/k/v may be separate layers
    else:
        heads = [(attn.qkv.weight, 0, "qkv"), (attn.proj.weight, 1, "heads")]
    if attn.gate is not None and heads:
        heads.append((attn.gate.weight, 0, "heads"))
    channels = [(fc.weight, 0, "glu" if isinstance(mlp, GluMlp) else "plain") for fc in _fc1_rows(mlp)]
    channels.append((mlp.fc2.weight, 1, "plain"))
    return heads, channels


def _group_sum(t: torch.Tensor, dim: int, layout: str, groups: int) -> torch.Tensor:
    """Sum of ``t`` over everything but the group index along ``dim``."""
    t = t.movedim(dim, 0)
    if layout == "qkv":  # rows: [q heads | k heads | v heads], each head head_dim rows
        t = t.reshape(3, groups, -1, *t.shape[1:]).transpose(0, 1)
    elif layout == "glu":  # rows: [first half | second half] of the hidden channels
        t = t.reshape(2, groups, *t.shape[1:]).transpose(0, 1)
    else:
        t = t.reshape(groups, -1, *t.shape[1:])
    return t.reshape(groups, -1).sum(dim=1)


def _magnitude_scores(block: nn.Module, p: int) -> Tuple[torch.Tensor, torch.Tensor]:
    head_groups, channel_groups = _weight_groups(block)
    if _is_eva_block(block):
        head_groups = []  # heads are not pruned there (see _check_block): no scores
    h, c = block.attn.num_heads, _hidden(block.mlp)
    heads = sum((_group_sum(w.detach().abs().pow(p), d, lay, h) for w, d, lay in head_groups),
                torch.zeros(h, device=block.attn.proj.weight.device))
    channels = sum(_group_sum(w.detach().abs().pow(p), d, lay, c) for w, d, lay in channel_groups)
    return heads, channels


def _batches(data: Iterable, num_batches: int):
    for i, batch in enumerate(data):
        if i >= num_batches:
            break
        if isinstance(batch, torch.Tensor):
            yield batch, None
        else:
            yield batch[0], batch[1] if len(batch) > 1 else None


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _activation_scores(model: nn.Module, data: Iterable, num_batches: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    stats: Dict[int, List[torch.Tensor]] = {}
    handles = []

    def head_hook(i, heads):
        def hook(module, args):
            y = args[0].detach().float()
            norms = y.reshape(*y.shape[:-1], heads, -1).norm(dim=-1)  # per-head output norm
            stats[i][0] += norms.reshape(-1, heads).mean(0)
        return hook

    def channel_hook(i):
        def hook(module, args):
            stats[i][1] += args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).mean(0)
        return hook

    for i, block in enumerate(model.blocks):
        stats[i] = [torch.zeros(block.attn.num_heads), torch.zeros(_hidden(block.mlp))]
        handles.append(block.attn.proj.register_forward_pre_hook(head_hook(i, block.attn.num_heads)))
        handles.append(block.mlp.fc2.register_forward_pre_hook(channel_hook(i)))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for images, _ in _batches(data, num_batches):
                model(images.to(_model_device(model)))
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("the calibration data yielded no batches")
    return [(s[0].cpu(), s[1].cpu()) for s in (stats[i] for i in range(len(model.blocks)))]


def _taylor_scores(model: nn.Module, data: Iterable, num_batches: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    params = [p for p in model.parameters()]
    saved = [(p.requires_grad, p.grad) for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()  # no dropout or stochastic depth while scoring
    scores = [[torch.zeros(b.attn.num_heads), torch.zeros(_hidden(b.mlp))] for b in model.blocks]
    seen = 0
    try:
        for images, labels in _batches(data, num_batches):
            if labels is None:
                raise ValueError("the taylor criterion needs labelled batches: (images, labels)")
            device = _model_device(model)
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            model.zero_grad(set_to_none=True)
            loss.backward()
            for s, block in zip(scores, model.blocks):
                head_groups, channel_groups = _weight_groups(block)
                h, c = block.attn.num_heads, _hidden(block.mlp)
                s[0] += sum((_group_sum((w * w.grad).detach().abs(), d, lay, h) for w, d, lay in head_groups),
                            torch.zeros(h, device=device)).cpu()
                s[1] += sum(_group_sum((w * w.grad).detach().abs(), d, lay, c) for w, d, lay in channel_groups).cpu()
            seen += 1
    finally:
        for p, (req, grad) in zip(params, saved):
            p.requires_grad_(req)
            p.grad = grad
        model.train(was_training)
    if seen == 0:
        raise ValueError("the calibration data yielded no batches")
    return [(a, b) for a, b in scores]


def importance(
    model: nn.Module,
    criterion: str = "l2",
    data: Optional[Iterable] = None,
    num_batches: int = 4,
) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Importance of every head and MLP hidden channel, per block: ``[(head_scores, channel_scores)]``.

    Criteria (higher = more important):

    * ``"l1"``/``"l2"``: weight magnitude, no data. A head is its q/k/v rows, its ``proj`` columns
      (and gate rows); a channel is its ``fc1`` row(s) and ``fc2`` column.
    * ``"activation"``: from ``num_batches`` calibration batches of images (labels unused): per-head
      output norm at the input of ``attn.proj``, mean ``|activation|`` of each hidden channel.
    * ``"taylor"``: first order, ``|w * dL/dw|`` summed over each group, from labelled batches
      ``(images, labels)`` with cross-entropy.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion in ("l1", "l2"):
        p = 1 if criterion == "l1" else 2
        return [_magnitude_scores(b, p) for b in model.blocks]
    if data is None:
        raise ValueError(f"the {criterion!r} criterion needs calibration data (data=a DataLoader or list of batches); "
                         "use criterion='l1' or 'l2' to prune without data")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    if criterion == "activation":
        return _activation_scores(model, data, num_batches)
    return _taylor_scores(model, data, num_batches)


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

def _mask_input(module: nn.Module, args):
    mask = getattr(module, MASK_BUFFER)
    return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])


def _set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    if hasattr(module, MASK_BUFFER):
        getattr(module, MASK_BUFFER).copy_(mask)
        return
    module.register_buffer(MASK_BUFFER, mask, persistent=False)
    module.register_forward_pre_hook(_mask_input)


def _clear_mask(module: nn.Module) -> None:
    if hasattr(module, MASK_BUFFER):
        delattr(module, MASK_BUFFER)
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _mask_input:
                del module._forward_pre_hooks[key]


def plan_channels(
    model: nn.Module,
    heads_pruned: Ratio = 0.0,
    mlp_pruned: Ratio = 0.0,
    criterion: str = "l2",
    data: Optional[Iterable] = None,
    num_batches: int = 4,
) -> ChannelPlan:
    """Choose the heads and MLP channels to keep (nothing is changed).

    Args:
        heads_pruned: share of heads removed per block, in ``[0, 1)``: one number for every block or
            one per block. Rounded to whole heads, at least one kept (ViT-S: 1/3 removes 2 of 6).
        mlp_pruned: share of MLP hidden channels removed, likewise; kept counts round to a multiple
            of 8 where possible.
        criterion, data, num_batches: see :func:`importance`.
    """
    _check_supported(model)
    if has_masks(model):
        raise ValueError("the model already has channel masks: call remove_masks(model) or materialize(model) first")
    depth = len(model.blocks)
    head_ratios = _per_block(heads_pruned, depth, "heads_pruned")
    mlp_ratios = _per_block(mlp_pruned, depth, "mlp_pruned")
    keeps = []
    for i, (block, hr, mr) in enumerate(zip(model.blocks, head_ratios, mlp_ratios)):
        nh, hidden = kept_heads(block.attn.num_heads, hr), kept_channels(_hidden(block.mlp), mr)
        _check_block(i, block, nh < block.attn.num_heads, hidden < _hidden(block.mlp))
        keeps.append((nh, hidden))
    needs_scores = any(nh < b.attn.num_heads or c < _hidden(b.mlp) for (nh, c), b in zip(keeps, model.blocks))
    scores = importance(model, criterion, data, num_batches) if needs_scores else None
    blocks = []
    for i, (block, (nh, hidden)) in enumerate(zip(model.blocks, keeps)):
        h_all, c_all = block.attn.num_heads, _hidden(block.mlp)
        heads = list(range(h_all)) if nh == h_all else top_mask(scores[i][0], nh).nonzero().flatten().tolist()
        mlp = list(range(c_all)) if hidden == c_all else top_mask(scores[i][1], hidden).nonzero().flatten().tolist()
        blocks.append(BlockChannels(heads, mlp, h_all, c_all))
    return ChannelPlan(blocks, criterion if needs_scores else "")


def apply_masks(model: nn.Module, plan: ChannelPlan) -> nn.Module:
    """Mask the heads and channels ``plan`` drops (exact, not faster; see :func:`materialize`)."""
    _check_supported(model)
    if len(plan.blocks) != len(model.blocks):
        raise ValueError(f"the plan covers {len(plan.blocks)} blocks, the model has {len(model.blocks)}")
    for i, (block, b) in enumerate(zip(model.blocks, plan.blocks)):
        attn, mlp = block.attn, block.mlp
        if b.num_heads != attn.num_heads or b.hidden != _hidden(mlp):
            raise ValueError(f"block {i}: the plan is for {b.num_heads} heads / {b.hidden} channels, the block has "
                             f"{attn.num_heads} / {_hidden(mlp)} (already materialised?)")
        prune_heads, prune_mlp = len(b.heads) < b.num_heads, len(b.mlp) < b.hidden
        _check_block(i, block, prune_heads, prune_mlp)
        device = attn.proj.weight.device
        if prune_heads:
            head_mask = torch.zeros(attn.num_heads, device=device)
            head_mask[b.heads] = 1.0
            if hasattr(attn, HEAD_BUFFER):
                getattr(attn, HEAD_BUFFER).copy_(head_mask)
            else:
                attn.register_buffer(HEAD_BUFFER, head_mask, persistent=False)
            _set_mask(attn.proj, head_mask.repeat_interleave(attn.head_dim))
        if prune_mlp:
            channel_mask = torch.zeros(_hidden(mlp), device=device)
            channel_mask[b.mlp] = 1.0
            _set_mask(mlp.fc2, channel_mask)
    return model


def has_masks(model: nn.Module) -> bool:
    """Whether channel masks are applied to ``model``."""
    return any(hasattr(m, MASK_BUFFER) for m in model.modules())


def remove_masks(model: nn.Module) -> nn.Module:
    """Remove all channel masks (the full model again)."""
    for module in model.modules():
        _clear_mask(module)
        if hasattr(module, HEAD_BUFFER):
            delattr(module, HEAD_BUFFER)
    return model


def prune_channels(
    model: nn.Module,
    heads_pruned: Ratio = 0.0,
    mlp_pruned: Ratio = 0.0,
    criterion: str = "l2",
    data: Optional[Iterable] = None,
    num_batches: int = 4,
) -> ChannelPlan:
    """Rank, choose and mask heads and MLP channels in one call (see :func:`plan_channels`).

    Returns the plan. The masked model is exact but not faster: call :func:`materialize` next.
    """
    plan = plan_channels(model, heads_pruned, mlp_pruned, criterion, data, num_batches)
    if plan.prunes:
        apply_masks(model, plan)
    return plan


def apply_channel_setting(model: nn.Module, heads_pruned: Ratio = 0.0, mlp_pruned: Ratio = 0.0,
                          criterion: str = "l2", materialize_layers: bool = True) -> nn.Module:
    """The channel keys of settings text (``heads_pruned``, ``mlp_pruned``, ``criterion``,
    ``materialize``) applied to ``model``: data-free ranking, masks, then smaller layers.

    Raises:
        ValueError: a criterion that needs data (use :func:`prune_channels` with ``data=``).
    """
    if criterion not in ("l1", "l2"):
        raise ValueError(f"settings take the data-free criteria l1 or l2, got {criterion!r}; "
                         "use tokenslim.prune_channels(..., data=...) for activation or taylor")
    plan = prune_channels(model, heads_pruned, mlp_pruned, criterion)
    if plan.prunes and materialize_layers:
        materialize(model)
    return model


# ---------------------------------------------------------------------------------------------
# Materialisation
# ---------------------------------------------------------------------------------------------

def _slice_linear(layer: nn.Linear, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> nn.Linear:
    w = layer.weight.detach()
    b = layer.bias.detach() if layer.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.train(layer.training)
    return new


def _slice_block(block: nn.Module, heads: List[int], channels: List[int]) -> None:
    attn, mlp = block.attn, block.mlp
    device = attn.proj.weight.device
    if len(heads) < attn.num_heads:
        hd = attn.head_dim
        head_idx = torch.tensor(heads, device=device)
        per_head = (head_idx[:, None] * hd + torch.arange(hd, device=device)).flatten()
        qkv_rows = torch.cat([per_head + j * attn.attn_dim for j in range(3)])
        scale = attn.scale
        attn.qkv = _slice_linear(attn.qkv, rows=qkv_rows)
        attn.proj = _slice_linear(attn.proj, cols=per_head)
        if attn.gate is not None:
            attn.gate = _slice_linear(attn.gate, rows=per_head)
        attn.num_heads = len(heads)
        attn.attn_dim = len(heads) * hd
        attn.scale = scale  # head_dim is unchanged, and so is the scale: keep it explicitly
    if len(channels) < _hidden(mlp):
        idx = torch.tensor(channels, device=device)
        if isinstance(mlp, SwiGLU):
            mlp.fc1_g = _slice_linear(mlp.fc1_g, rows=idx)
            mlp.fc1_x = _slice_linear(mlp.fc1_x, rows=idx)
        elif isinstance(mlp, GluMlp):
            mlp.fc1 = _slice_linear(mlp.fc1, rows=torch.cat([idx, idx + _hidden(mlp)]))
        else:
            mlp.fc1 = _slice_linear(mlp.fc1, rows=idx)
        mlp.fc2 = _slice_linear(mlp.fc2, cols=idx)


def materialize(model: nn.Module) -> nn.Module:
    """Turn the applied masks into physically smaller layers (in place), so the speed-up is real.

    Slices ``qkv``/``proj`` (and ``gate``) per kept head and ``fc1``/``fc2`` per kept channel (both
    halves of a gated MLP), updates ``num_heads`` and ``attn_dim`` and keeps the attention scale.
    The kept indices (relative to the original model) are recorded in ``model.tokenslim_channels``
    for :func:`restore_channels`. Outputs equal the masked model's to float rounding.
    """
    _check_supported(model)
    if not has_masks(model):
        raise ValueError("the model has no channel masks: call prune_channels(model, ...) first")
    previous = getattr(model, "tokenslim_channels", None)
    blocks = []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        head_mask = getattr(attn, HEAD_BUFFER, None)
        chan_mask = getattr(mlp.fc2, MASK_BUFFER, None)
        h_all, c_all = attn.num_heads, _hidden(mlp)
        heads = head_mask.nonzero().flatten().tolist() if head_mask is not None else list(range(h_all))
        channels = chan_mask.nonzero().flatten().tolist() if chan_mask is not None else list(range(c_all))
        _slice_block(block, heads, channels)
        if previous is not None:  # compose with an earlier materialisation: indices stay absolute
            prev = previous["blocks"][i]
            heads, channels = [prev["heads"][h] for h in heads], [prev["mlp"][c] for c in channels]
            blocks.append(BlockChannels(heads, channels, prev["num_heads"], prev["hidden"]))
        else:
            blocks.append(BlockChannels(heads, channels, h_all, c_all))
    remove_masks(model)
    model.tokenslim_channels = ChannelPlan(blocks, "materialized").to_dict()
    return model


def restore_channels(model: nn.Module, description: Union[dict, ChannelPlan]) -> nn.Module:
    """Give a freshly created model the shapes of a materialised one, ready for ``load_state_dict``.

    ``description`` is ``pruned.tokenslim_channels`` (saved next to the weights)::

        torch.save({"channels": pruned.tokenslim_channels, "state_dict": pruned.state_dict()}, path)
        ckpt = torch.load(path)
        model = restore_channels(timm.create_model(name), ckpt["channels"])
        model.load_state_dict(ckpt["state_dict"])
    """
    plan = description if isinstance(description, ChannelPlan) else ChannelPlan.from_dict(description)
    _check_supported(model)
    if len(plan.blocks) != len(model.blocks):
        raise ValueError(f"the description covers {len(plan.blocks)} blocks, the model has {len(model.blocks)}")
    for i, (block, b) in enumerate(zip(model.blocks, plan.blocks)):
        if b.num_heads != block.attn.num_heads or b.hidden != _hidden(block.mlp):
            raise ValueError(f"block {i}: the description is for {b.num_heads} heads / {b.hidden} channels, "
                             f"the model has {block.attn.num_heads} / {_hidden(block.mlp)}")
        for what, kept, total in (("head", b.heads, b.num_heads), ("MLP channel", b.mlp, b.hidden)):
            indices = list(kept)
            if not indices:
                raise ValueError(f"block {i}: the description keeps no {what}s")
            if len(set(indices)) != len(indices):
                raise ValueError(f"block {i}: the description repeats {what} indices; it is corrupt")
            bad = [j for j in indices if not 0 <= int(j) < total]
            if bad:
                raise ValueError(f"block {i}: {what} index {bad[0]} is out of range for {total} {what}s; "
                                 "the description does not belong to this model")
        _check_block(i, block, len(b.heads) < b.num_heads, len(b.mlp) < b.hidden)
        _slice_block(block, b.heads, b.mlp)
    model.tokenslim_channels = plan.to_dict()
    return model
