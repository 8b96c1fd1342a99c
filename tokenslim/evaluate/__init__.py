"""Accuracy evaluation: data pipelines, metrics against a reference model, exact distributed runs."""
from .accuracy import EvalResult, evaluate
from .data import (
    ImageFolderDataset,
    LabelFileDataset,
    TarGzImageFolder,
    TarImageFolder,
    check_labels,
    dataset_targets,
    holdout,
    match_classes,
    model_class_names,
    open_dataset,
    parse_label_file,
    resolve_transform,
    select,
    subset,
)
from ..ranks import DistInfo, init_from_env, shard_indices

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
    "holdout",
    "init_from_env",
    "match_classes",
    "model_class_names",
    "open_dataset",
    "parse_label_file",
    "resolve_transform",
    "shard_indices",
    "select",
    "subset",
]
