"""tokenslim: make timm Vision Transformers faster without retraining.

The one-liner::

    import timm, tokenslim
    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    tokenslim.patch(model, r=16)   # ToMe: merge 16 tokens in every block
"""
from .adapters.timm_channels import ChannelPlan, apply_masks, materialize, plan_channels, prune_channels, remove_masks, restore_channels
from .ops import source_matrix, unmerge
from .schedule import ReductionSettings, RSpec, TokenPlan, parse_r, plan_tokens
from . import spec
from .patching import is_patched, patch, token_plan, trace_merges, unpatch
from .spec import apply, format_setting, parse_setting
from .adapters.timm_vit import MergeTrace

from .versions import __version__

__all__ = [
    "apply",
    "format_setting",
    "parse_setting",
    "spec",
    "ChannelPlan",
    "apply_masks",
    "materialize",
    "plan_channels",
    "prune_channels",
    "remove_masks",
    "restore_channels",
    "MergeTrace",
    "ReductionSettings",
    "RSpec",
    "TokenPlan",
    "is_patched",
    "parse_r",
    "patch",
    "plan_tokens",
    "source_matrix",
    "token_plan",
    "trace_merges",
    "unmerge",
    "unpatch",
]
