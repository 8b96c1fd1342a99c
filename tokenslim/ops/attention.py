"""Multi-head attention with a per-key bias, plus what token reduction reads from it: pure tensors.

Every framework adapter (timm, transformers, open_clip) projects its own queries, keys and values
and calls :func:`reducing_attention`; the attention itself, ToMe's metric, EViT's class-attention
row and PPT's value-weighted score are computed here once for all of them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class AttentionResult(NamedTuple):
    """Output of :func:`reducing_attention`.

    Attributes:
        out: ``[B, H, N, D]`` attention output (before the heads are concatenated).
        metric: ``[B, N, D]`` keys averaged over heads (ToMe's metric), or ``None``.
        cls_attn: ``[B, N]`` the class token's attention row averaged over heads, or ``None``.
        value_score: ``[B, N]`` sum over heads of class attention times value norm, or ``None``.
        received: ``[B, N]`` the attention each token receives, averaged over queries and heads
            (MCTF's informativeness), or ``None``.
    """

    out: torch.Tensor
    metric: Optional[torch.Tensor]
    cls_attn: Optional[torch.Tensor]
    value_score: Optional[torch.Tensor] = None
    received: Optional[torch.Tensor] = None


def head_mean(t: torch.Tensor, head_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the head dimension (1) of ``t``, over the kept heads only when heads are masked."""
    if head_mask is None:
        return t.mean(dim=1)
    w = head_mask.to(t.dtype).view(1, -1, *([1] * (t.dim() - 2)))
    return (t * w).sum(dim=1) / head_mask.sum().to(t.dtype)


def reducing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_size: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    fused: bool = True,
    dropout_p: float = 0.0,
    head_mask: Optional[torch.Tensor] = None,
    return_metric: bool = False,
    return_cls_attn: bool = False,
    return_value_score: bool = False,
    return_received: bool = False,
) -> AttentionResult:
    """Attention of ``[B, H, N, D]`` queries, keys and values with an additive per-key bias.

    Args:
        q, k, v: ``[B, H, N, D]``.
        log_size: ``[B, 1, 1, N]`` float32 proportional-attention bias (``log(size)``), or ``None``.
        scale: logit scale; ``None`` is ``D ** -0.5``, left to SDPA's default so that the call is
            the framework's own call, bit for bit.
        fused: ``F.scaled_dot_product_attention`` (kept fused: the bias is a float mask in the
            query dtype); ``False``: explicit softmax, as timm's ``fused_attn=False`` path.
        dropout_p: attention dropout (pass 0 outside training).
        head_mask: ``[H]`` bool, heads kept by channel pruning; masked heads take no part in the
            metric or the scores, as if removed.
        return_metric / return_cls_attn / return_value_score: what reduction needs. The class row
            is computed alone (``q_cls`` against all keys, same scale and bias, float32), so the
            full map is never built and attention stays fused.
        return_received: the attention every key receives, averaged over queries and heads. It
            needs the whole map: computed beside the fused attention in float32 (about one more
            attention map of work).
    """
    metric = head_mean(k, head_mask) if return_metric else None
    bias = None if log_size is None else log_size.to(q.dtype)
    row_scale = q.shape[-1] ** -0.5 if scale is None else scale
    cls_attn = value_score = None
    if return_cls_attn or return_value_score:
        row = (q[:, :, :1].float() * row_scale) @ k.float().transpose(-2, -1)
        if log_size is not None:
            row = row + log_size
        row = row.softmax(dim=-1)[:, :, 0]  # [B, H, N]
        if return_cls_attn:
            cls_attn = head_mean(row, head_mask)
        if return_value_score:
            weighted = row * v.float().norm(dim=-1)
            if head_mask is not None:
                weighted = weighted * head_mask.to(weighted.dtype).view(1, -1, 1)
            value_score = weighted.sum(dim=1)
    received = None
    if return_received:
        logits = (q.float() * row_scale) @ k.float().transpose(-2, -1)
        if log_size is not None:
            logits = logits + log_size
        received = head_mean(logits.softmax(dim=-1).mean(dim=2), head_mask)
    if fused:
        if scale is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    else:
        logits = (q * row_scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        attn = logits.softmax(dim=-1)
        if dropout_p:
            attn = F.dropout(attn, p=dropout_p)
        y = attn @ v
    return AttentionResult(y, metric, cls_attn, value_score, received)
