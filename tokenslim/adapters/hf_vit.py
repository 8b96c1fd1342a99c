"""The Hugging Face ``transformers`` adapter: token reduction in ViT, DeiT, DINOv2 and CLIP vision models.

The same ops, methods and settings as the timm adapter (:mod:`tokenslim.adapters.timm_vit`); only the wiring
to ``transformers`` modules lives here.

Design:

* The *base* model (``ViTModel``, ``DeiTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
  ``CLIPVisionModel``) gets a subclass whose ``forward`` runs the layers with reduction; every
  wrapper around it (``ViTForImageClassification``, ``DeiTForImageClassificationWithTeacher``,
  ``Dinov2ForImageClassification``, ``CLIPModel``, ...) is left alone. No layer is rebuilt and no
  weight is touched, so ``state_dict`` keys and ``from_pretrained`` checkpoints are unchanged.
* ``last_hidden_state`` keeps the unpatched shape: every merged token is repeated at each patch
  position it holds. The heads (class token, distillation token, DINOv2's class + mean-patch
  classifier, CLIP's pooled class token) are therefore exact without modification; a mean over
  the patch positions is the size-weighted mean of the merged tokens.
* Until the first reduction a layer runs as the library's own module (so ``r=0`` is the
  unpatched computation); reducing layers and their attention are still called as modules, so
  hooks fire (:mod:`tokenslim.adapters.calls`); reducing layers compute attention with
  ``F.scaled_dot_product_attention`` whatever ``config._attn_implementation`` says, because the
  eager path has no place for the ``log(size)`` bias of proportional attention.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops import unmerge
from ..ops.attention import AttentionResult, reducing_attention
from ..reduction import BlockStep, block_steps, reduce_step, step_log_size
from ..schedule import ReductionSettings
from ..versions import check_installed
from .calls import base_class, call_through, check_reducible, hooked_by_name, unhook_all, wire

TRANSFORMERS_MIN = (5, 24, 0)
TRANSFORMERS_MAX = (5, 24, 999)


def check_transformers_version(version: Optional[str] = None) -> None:
    """Raise a clear error unless the installed ``transformers`` is a release tokenslim is tested with."""
    check_installed("transformers", version, "transformers", TRANSFORMERS_MIN, TRANSFORMERS_MAX, "the layer internals of transformers",
                  "transformers>=5.24,<5.25")


# --------------------------------------------------------------------------------------------
# One layer with reduction, per family
# --------------------------------------------------------------------------------------------

def hf_attention(attn: nn.Module, x: torch.Tensor, log_size: Optional[torch.Tensor], step: BlockStep) -> AttentionResult:
    """A transformers self-attention (separate ``q_proj``/``k_proj``/``v_proj``) with the size bias.

    Works for ``ViTAttention``/``DeiTAttention``/``Dinov2Attention`` (``o_proj``, ``scaling``) and
    ``CLIPAttention`` (``out_proj``, ``scale``). The projections are called as modules, so LoRA or
    other wrappers on them take effect. ``out`` is the projected ``[B, N, C]`` output.
    """
    batch, n, _ = x.shape
    head_dim = attn.head_dim
    shape = (batch, n, -1, head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    scale = attn.scaling if hasattr(attn, "scaling") else attn.scale
    dropout = attn.attention_dropout if hasattr(attn, "attention_dropout") else attn.dropout
    res = reducing_attention(
        q, k, v, log_size, scale=scale, fused=True, dropout_p=dropout if attn.training else 0.0,
        return_metric=step.wants_metric, return_cls_attn=step.wants_cls_attn,
        return_value_score=step.wants_value_score, return_received=step.wants_received,
    )
    out_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return res._replace(out=out_proj(res.out.transpose(1, 2).reshape(batch, n, -1)))


def _attention_call(attn: nn.Module, x: torch.Tensor, log_size: Optional[torch.Tensor], step: BlockStep):
    # transformers' attention modules return (output, weights); weights are not computed when reducing.
    res = hf_attention(attn, x, log_size, step)
    return (res.out, None), res


def _attend(attn: nn.Module, x: torch.Tensor, sizes: Optional[torch.Tensor],
            step: BlockStep) -> Tuple[torch.Tensor, AttentionResult]:
    """The attention through its ``__call__`` (hooks fire): its output as the hooks leave it, and the scores."""
    out, res = call_through(attn, _attention_call, x, step_log_size(step, sizes), step)
    return out[0], res


def _vit_layer(layer: nn.Module, x, sizes, source, step):
    """``ViTLayer``/``DeiTLayer``: pre-norm attention, reduction, pre-norm MLP (hidden dropout on both)."""
    out, attn = _attend(layer.attention, layer.layernorm_before(x), sizes, step)
    x = x + layer.dropout(out)
    x, sizes, source = reduce_step(x, attn, sizes, source, step)
    x = x + layer.dropout(layer.mlp(layer.layernorm_after(x)))
    return x, sizes, source


def _dinov2_layer(layer: nn.Module, x, sizes, source, step):
    """``Dinov2Layer`` (and with registers): LayerScale and drop path on both branches."""
    out, attn = _attend(layer.attention, layer.norm1(x), sizes, step)
    x = x + layer.drop_path(layer.layer_scale1(out))
    x, sizes, source = reduce_step(x, attn, sizes, source, step)
    x = x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
    return x, sizes, source


def _clip_layer(layer: nn.Module, x, sizes, source, step):
    """``CLIPEncoderLayer``."""
    out, attn = _attend(layer.self_attn, layer.layer_norm1(x), sizes, step)
    x = x + out
    x, sizes, source = reduce_step(x, attn, sizes, source, step)
    x = x + layer.mlp(layer.layer_norm2(x))
    return x, sizes, source


# --------------------------------------------------------------------------------------------
# The reduction loop shared by every family
# --------------------------------------------------------------------------------------------

def run_layers(
    layers: Sequence[nn.Module],
    reducing_layer: Callable,
    x: torch.Tensor,
    settings: ReductionSettings,
    num_prefix_tokens: int,
    collect: bool,
    attention: Callable[[nn.Module], nn.Module],
    supported: Tuple[type, type],
) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], List[torch.Tensor]]:
    """Run ``layers`` with reduction.

    Every layer is called as a module (a reducing one through
    :func:`~tokenslim.adapters.calls.call_through`), so its hooks fire and transformers' own
    gradient checkpointing of the layer applies; ``attention(layer)`` is its attention module and
    ``supported`` the (layer, attention) classes it must have.

    Returns:
        The reduced tokens after the last layer, the function that expands them to the unpatched
        shape (merged tokens repeated over the patches they hold, zeros where pruning dropped a
        token; apply per-token norms before it, as timm does) and, when ``collect``, every layer's
        output already expanded (for ``output_hidden_states``).
    """
    plan = settings.plan(x.shape[1], num_prefix_tokens)
    sizes: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    has_dropped = False
    hidden: List[torch.Tensor] = []
    for i, (layer, step) in enumerate(zip(layers, block_steps(settings, plan, num_prefix_tokens))):
        has_dropped = plan.dropped[i]
        if source is None and not step.reduces:
            x = layer(x, None)
        else:
            check_reducible(i, layer, attention(layer), (supported[0],), (supported[1],),
                            f"{supported[0].__name__} with {supported[1].__name__}")
            x, sizes, source = call_through(layer, reducing_layer, x, sizes, source, step)
        if collect:
            hidden.append(x if source is None else unmerge(x, source, has_dropped))

    def expand(t: torch.Tensor) -> torch.Tensor:
        return t if source is None else unmerge(t, source, has_dropped)

    return x, expand, hidden


def _flag(kwargs: Dict[str, Any], config: Any, name: str) -> bool:
    value = kwargs.pop(name, None)
    if value is None:
        value = getattr(config, name, False)
    return bool(value)


def _check_call(model: nn.Module, kwargs: Dict[str, Any], attention_mask: Optional[torch.Tensor]) -> Tuple[bool, bool]:
    """Read the output flags; refuse what token reduction cannot give. Returns (hidden, return_dict)."""
    hidden = _flag(kwargs, model.config, "output_hidden_states")
    attentions = _flag(kwargs, model.config, "output_attentions")
    return_dict = kwargs.pop("return_dict", None)
    return_dict = getattr(model.config, "return_dict", True) if return_dict is None else return_dict
    reduces = model.tokenslim.reduces
    if attentions and reduces:
        raise ValueError(
            "output_attentions=True cannot be combined with token reduction: attention maps shrink from "
            "layer to layer and are computed fused. Set r=0 and keep_rate=None (or tokenslim.unpatch(model)) "
            "to read attention maps."
        )
    if attention_mask is not None and reduces:
        raise ValueError("attention_mask cannot be combined with token reduction: reduced tokens no longer line "
                         "up with the mask. Set r=0 and keep_rate=None to use masks.")
    if attentions:
        raise ValueError("output_attentions=True is not supported on a patched model; call tokenslim.unpatch(model) "
                         "first (attention maps come from the unpatched forward)")
    return hidden, bool(return_dict)


def _finish(output, return_dict: bool):
    return output if return_dict else output.to_tuple()


# --------------------------------------------------------------------------------------------
# Patched base models
# --------------------------------------------------------------------------------------------

class _TokenSlimHF:
    """Shared pieces of the patched base models."""

    # Set per family by _patched_class: the layer list, the reducing layer, the protected prefix.
    tokenslim: ReductionSettings
    tokenslim_layers: nn.ModuleList
    num_prefix_tokens: int
    _tokenslim_layer: Callable
    _tokenslim_attention: Callable[[nn.Module], nn.Module]
    _tokenslim_supported: Tuple[type, type]

    def _tokenslim_run(self, x: torch.Tensor, hidden: bool):
        cls = type(self)
        return run_layers(self.tokenslim_layers, cls._tokenslim_layer, x, self.tokenslim, self.num_prefix_tokens,
                          hidden, cls._tokenslim_attention, cls._tokenslim_supported)


def _vit_forward(self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None,
                 attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    hidden, return_dict = _check_call(self, kwargs, attention_mask)
    expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
    if pixel_values.dtype != expected_dtype:
        pixel_values = pixel_values.to(expected_dtype)
    x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos,
                        interpolate_pos_encoding=interpolate_pos_encoding)
    x_final, expand, states = self._tokenslim_run(x, hidden)
    sequence_output = expand(self.layernorm(x_final))
    pooled = self.pooler(sequence_output) if self.pooler is not None else None
    out = BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled,
                                     hidden_states=tuple([x] + states) if hidden else None)
    return _finish(out, return_dict)


def _dinov2_forward(self, pixel_values=None, bool_masked_pos=None, attention_mask=None, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    hidden, return_dict = _check_call(self, kwargs, attention_mask)
    x = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
    x_final, expand, states = self._tokenslim_run(x, hidden)
    sequence_output = expand(self.layernorm(x_final))
    out = BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0, :],
                                     hidden_states=tuple([x] + states) if hidden else None)
    return _finish(out, return_dict)


def _clip_forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    hidden, return_dict = _check_call(self, kwargs, kwargs.pop("attention_mask", None))
    x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))
    x_final, expand, states = self._tokenslim_run(x, hidden)
    last = expand(x_final)
    out = BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=self.post_layernorm(last[:, 0, :]),
                                     hidden_states=tuple([x] + states) if hidden else None)
    return _finish(out, return_dict)


def _family_table() -> Dict[type, Dict[str, Any]]:
    """The supported base classes of the installed transformers and how each is wired."""
    from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer, CLIPVisionModel
    from transformers.models.deit.modeling_deit import DeiTAttention, DeiTLayer, DeiTModel
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention, Dinov2Layer, Dinov2Model
    from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
        Dinov2WithRegistersAttention,
        Dinov2WithRegistersLayer,
        Dinov2WithRegistersModel,
    )
    from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTModel

    def attention(layer: nn.Module) -> nn.Module:
        return layer.attention

    def self_attn(layer: nn.Module) -> nn.Module:
        return layer.self_attn

    return {
        ViTModel: dict(layer=ViTLayer, attn=ViTAttention, attention=attention, reducing=_vit_layer,
                       forward=_vit_forward, layers=lambda m: m.layers, prefix=lambda m: 1, pools_patches=False),
        DeiTModel: dict(layer=DeiTLayer, attn=DeiTAttention, attention=attention, reducing=_vit_layer,
                        forward=_vit_forward, layers=lambda m: m.layers, prefix=lambda m: 2, pools_patches=False),
        Dinov2Model: dict(layer=Dinov2Layer, attn=Dinov2Attention, attention=attention, reducing=_dinov2_layer,
                          forward=_dinov2_forward, layers=lambda m: m.encoder.layer, prefix=lambda m: 1,
                          pools_patches=True),
        Dinov2WithRegistersModel: dict(layer=Dinov2WithRegistersLayer, attn=Dinov2WithRegistersAttention,
                                       attention=attention, reducing=_dinov2_layer,
                                       forward=_dinov2_forward, layers=lambda m: m.encoder.layer,
                                       prefix=lambda m: 1 + m.config.num_register_tokens, pools_patches=True),
        CLIPVisionModel: dict(layer=CLIPEncoderLayer, attn=CLIPAttention, attention=self_attn, reducing=_clip_layer,
                              forward=_clip_forward, layers=lambda m: m.encoder.layers, prefix=lambda m: 1,
                              pools_patches=False),
    }


_PATCHED: Dict[type, type] = {}


def _patched_class(base_cls: type, family: Dict[str, Any]) -> type:
    """One patched subclass per supported base class, made once (so ``type(model)`` is stable)."""
    if base_cls not in _PATCHED:
        layers, prefix = family["layers"], family["prefix"]
        attrs = {
            "forward": family["forward"],
            "_tokenslim_layer": staticmethod(family["reducing"]),
            "_tokenslim_attention": staticmethod(family["attention"]),
            "_tokenslim_supported": (family["layer"], family["attn"]),
            "tokenslim_layers": property(lambda self: layers(self)),
            "num_prefix_tokens": property(lambda self: prefix(self)),
            "__doc__": f"A {base_cls.__name__} patched by tokenslim (see tokenslim.patch).",
            "__module__": __name__,
        }
        attrs["__qualname__"] = f"TokenSlim{base_cls.__name__}"
        _PATCHED[base_cls] = type(f"TokenSlim{base_cls.__name__}", (_TokenSlimHF, base_cls), attrs)
    return _PATCHED[base_cls]


def __getattr__(name: str) -> type:
    """The patched classes by name, made on demand: ``pickle`` finds ``TokenSlimViTModel`` and its
    siblings here when it loads a saved patched model in a fresh process."""
    if name.startswith("TokenSlim"):
        table = _family_table()
        for base_cls, family in table.items():
            if f"TokenSlim{base_cls.__name__}" == name:
                return _patched_class(base_cls, family)
        hooked = hooked_by_name(name, tuple(c for f in table.values() for c in (f["layer"], f["attn"])), __name__)
        if hooked is not None:
            return hooked
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _original_class(cls: type) -> Optional[type]:
    for base, patched in _PATCHED.items():
        if cls is patched:
            return base
    return None


def find_base_models(model: nn.Module) -> List[nn.Module]:
    """The supported transformers base vision models inside ``model`` (the model itself included)."""
    table = _family_table()
    found = []
    for module in model.modules():
        cls = _original_class(type(module)) or type(module)
        if cls in table:
            found.append(module)
    return found


def patch(model: nn.Module, **settings: Any) -> nn.Module:
    """Patch a ``transformers`` vision model in place; ``settings`` are those of :func:`tokenslim.patch`.

    Accepts ``ViTModel``/``ViTForImageClassification``, ``DeiTModel``/``DeiTForImageClassification``
    (``WithTeacher``: the distillation token is a protected prefix token), ``Dinov2Model``/
    ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel`` (registers protected) and
    ``CLIPVisionModel``/``CLIPVisionModelWithProjection``/``CLIPModel`` (its vision tower).

    Raises:
        TypeError: no supported vision model inside ``model``, or layers of another type.
        ValueError: bad settings; pruning without fusion where the head averages patch tokens.
        RuntimeError: an untested transformers release.
    """
    check_transformers_version()
    if str(settings.get("method", "")).lower() == "learned":
        raise ValueError("method='learned' (a trained merge policy) is available on timm ViT and Eva models; the transformers "
                         "adapter takes the training-free methods. Load the same weights into the timm model to use it")
    bases = find_base_models(model)
    if not bases:
        raise TypeError(
            f"tokenslim cannot patch {type(model).__module__}.{type(model).__qualname__}: it holds none of the "
            "supported transformers vision models (ViTModel, DeiTModel, Dinov2Model, Dinov2WithRegistersModel, "
            "CLIPVisionModel; their ...ForImageClassification / WithProjection / CLIPModel wrappers)"
        )
    if len(bases) > 1:
        raise TypeError(f"{type(model).__name__} holds {len(bases)} vision models; patch each one separately")
    base = bases[0]
    table = _family_table()
    base_cls = _original_class(type(base)) or type(base)
    family = table[base_cls]
    layers = family["layers"](base)
    for i, layer in enumerate(layers):
        if base_class(type(layer)) is not family["layer"] or base_class(type(family["attention"](layer))) \
                is not family["attn"]:
            raise TypeError(f"tokenslim cannot patch layer {i} of type {type(layer).__qualname__}: "
                            f"{base_cls.__name__} is supported with {family['layer'].__name__} layers (with "
                            f"{family['attn'].__name__}) only")
    reduction = ReductionSettings(len(layers), has_class_token=True, pools_patches=_pools_patches(model, family),
                                  **settings)
    base.__class__ = _patched_class(base_cls, family)
    base.tokenslim = reduction
    wire(layers, family["attention"], __name__)
    if model is not base:
        model.tokenslim = reduction
    return model


def _pools_patches(model: nn.Module, family: Dict[str, Any]) -> bool:
    # Dinov2ForImageClassification concatenates the class token and the mean patch token.
    return family["pools_patches"] and hasattr(model, "classifier")


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` (a no-op on an unpatched model)."""
    for module in model.modules():
        original = _original_class(type(module))
        if original is not None:
            module.__class__ = original
            if "tokenslim" in module.__dict__:
                del module.tokenslim
    unhook_all(model)
    if "tokenslim" in model.__dict__:
        del model.tokenslim
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether a transformers model holds a patched vision model."""
    return any(_original_class(type(m)) is not None for m in model.modules())
