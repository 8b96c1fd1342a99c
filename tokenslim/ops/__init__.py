"""Pure tensor functions: matching, merging, pruning, source maps. Nothing here knows about timm."""
from .matching import MergePlan, bipartite_soft_matching
from .merge import merge_tokens, size_log_bias, source_matrix, sizes_from_source, unmerge, update_source
from .prune import PrunePlan, prune_scores, prune_sizes, prune_tokens, select_tokens

__all__ = [
    "MergePlan",
    "PrunePlan",
    "bipartite_soft_matching",
    "merge_tokens",
    "prune_scores",
    "prune_sizes",
    "prune_tokens",
    "select_tokens",
    "size_log_bias",
    "source_matrix",
    "sizes_from_source",
    "unmerge",
    "update_source",
]
