"""Which parameters a recovery trains, LoRA through peft, and folding everything back."""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

import torch
from torch import nn

METHODS = ("bias", "norm", "bias_norm", "lora", "lora_bias_norm", "full", "merge")
LORA_TARGETS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|fc1_g|fc1_x))"
"""Exactly the attention and MLP Linear layers of timm blocks (a plain ``["proj"]`` would also catch
``patch_embed.proj``)."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__ in ("LayerNorm", "RmsNorm")


def trainable_parameters(model: nn.Module, method: str) -> Dict[str, nn.Parameter]:
    """The parameters ``method`` trains (``bias``/``norm``/``bias_norm``/``full``/``merge``), by name.

    ``merge``: the learned merge policy alone (:mod:`tokenslim.merge_policy`), the backbone frozen."""
    if method not in ("bias", "norm", "bias_norm", "full", "merge"):
        raise ValueError(f"trainable_parameters covers bias, norm, bias_norm, full and merge, not {method!r}")
    if method == "full":
        return dict(model.named_parameters())
    if method == "merge":
        from ..merge_policy import POLICY_ATTR

        return {n: p for n, p in model.named_parameters() if n.startswith(POLICY_ATTR + ".")}
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


def attach(model: nn.Module, method: str, lora_rank: int, lora_alpha: int) -> Tuple[nn.Module, Dict[str, nn.Parameter]]:
    """Freeze ``model`` but for what ``method`` trains; returns the module to train (a peft
    wrapper for the LoRA methods, else ``model``) and its trainable parameters by name."""
    for p in model.parameters():
        p.requires_grad_(False)
    if method.startswith("lora"):
        _require_peft()
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
        student = model
        params = trainable_parameters(model, method)
        for p in params.values():
            p.requires_grad_(True)
    if not params:
        raise ValueError(f"method {method!r} found nothing to train in this model")
    return student, params


def freeze_key_bias(model: nn.Module) -> List:
    """Zero the gradient of the key part of every trained ``attn.qkv.bias``; returns the hook
    handles (remove them after training).

    A key bias adds ``q . b`` to every attention logit of a query alike, so softmax ignores it and
    its gradient is rounding noise. Adam would scale that noise up to steps of the learning rate in
    random directions, and ToMe's matching, which compares keys, would then change at random; so
    the key bias stays as it is (its exact gradient is zero anyway).
    """
    handles = []
    for name, module in model.named_modules():
        if hasattr(module, "rotate_half"):
            continue  # rotary attention (timm Eva family): a rotated key bias differs per position and does train
        qkv = getattr(module, "qkv", None)
        qkv = getattr(qkv, "base_layer", qkv)  # under a peft LoRA wrapper
        bias = getattr(qkv, "bias", None) if isinstance(qkv, nn.Linear) else None
        if bias is None or not bias.requires_grad or bias.shape[0] % 3:
            continue
        dim = bias.shape[0] // 3
        mask = torch.ones_like(bias)
        mask[dim:2 * dim] = 0
        handles.append(bias.register_hook(lambda g, mask=mask: g * mask))
    return handles


def fold_back(model: nn.Module, student: nn.Module) -> None:
    """Merge LoRA adapters into ``model``'s own weights and make every parameter trainable again."""
    if student is not model:
        merged = student.merge_and_unload()
        if merged is not model:
            model.load_state_dict(merged.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def lora_target_names(model: nn.Module) -> List[str]:
    """Names of the modules ``method="lora"`` adapts (for checking the pattern on a model)."""
    pattern = re.compile(LORA_TARGETS + r"$")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
