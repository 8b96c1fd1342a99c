"""Accuracy evaluation: data pipelines, metrics against a reference model, exact distributed runs."""
from .accuracy import EvalResult, evaluate
from .data import LabelFileDataset, TarGzImageFolder, open_dataset, parse_label_file, resolve_transform, subset
from .distributed import DistInfo, init_from_env, shard_indices

__all__ = [
    "DistInfo",
    "EvalResult",
    "LabelFileDataset",
    "TarGzImageFolder",
    "evaluate",
    "init_from_env",
    "open_dataset",
    "parse_label_file",
    "resolve_transform",
    "shard_indices",
    "subset",
]
