"""Pure tensor functions: matching, merging, source maps. Nothing here knows about timm."""
from .matching import MergePlan, bipartite_soft_matching
from .merge import merge_tokens, size_log_bias, source_matrix, sizes_from_source, unmerge, update_source

__all__ = [
    "MergePlan",
    "bipartite_soft_matching",
    "merge_tokens",
    "size_log_bias",
    "source_matrix",
    "sizes_from_source",
    "unmerge",
    "update_source",
]
