"""Accuracy evaluation: data pipelines, metrics against a reference model, exact distributed runs."""
from .accuracy import EvalResult, evaluate
from .data import (
    ImageFolderDataset,
    LabelFileDataset,
    TarGzImageFolder,
    TarImageFolder,
    check_labels,
    dataset_targets,
    open_dataset,
    parse_label_file,
    resolve_transform,
    holdout,
    subset,
)
from .distributed import DistInfo, init_from_env, shard_indices

__all__ = [
    "DistInfo",
    "EvalResult",
    "ImageFolderDataset",
    "LabelFileDataset",
    "TarGzImageFolder",
    "TarImageFolder",
    "check_labels",
    "dataset_targets",
    "evaluate",
    "init_from_env",
    "open_dataset",
    "parse_label_file",
    "resolve_transform",
    "shard_indices",
    "holdout",
    "subset",
]
