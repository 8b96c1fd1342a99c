"""Evaluation data: image folders, tar archives, label files, deterministic subsets, transforms.

Everything resolves to a map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs:

* a folder of class sub-folders, or a ``.tar`` of them: timm's ``create_dataset`` (timm's readers);
* a ``.tar.gz``/``.tgz`` of class folders (timm's reader takes plain ``.tar`` only): decompressed
  once into memory, classes in sorted order like ImageFolder;
* a label file (``.txt``/``.csv``) listing ``filename label`` (space) or ``./path, label`` (comma)
  lines, paths relative to the label file.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_EXTENSIONS = (".txt", ".csv", ".lst")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def parse_label_file(path: str) -> List[Tuple[str, int]]:
    """Read ``(absolute image path, label)`` pairs from a label file.

    Accepts ``filename label`` lines (whitespace-separated, the label last) and ``./path, label``
    lines (comma-separated). Blank lines and lines starting with ``#`` are skipped.

    Raises:
        ValueError: a malformed line (with its number), or no entries.
        FileNotFoundError: listed images that do not exist (the first few are named).
    """
    root = Path(path).resolve().parent
    samples: List[Tuple[str, int]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, label = line.rsplit(",", 1) if "," in line else (line.rsplit(None, 1) + [""])[:2]
            name, label = name.strip(), label.strip()
            try:
                target = int(label)
            except ValueError:
                raise ValueError(
                    f"{path}:{lineno}: expected 'filename label' or './path, label' with an integer label, got {line!r}"
                ) from None
            samples.append((str((root / name).resolve()), target))
    if not samples:
        raise ValueError(f"label file {path} lists no images")
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3])
        raise FileNotFoundError(
            f"label file {path} names {len(missing)} of {len(samples)} images that do not exist "
            f"(paths are relative to the label file's folder), e.g. {shown}"
        )
    return samples


class LabelFileDataset(Dataset):
    """Images listed in a label file (see :func:`parse_label_file`)."""

    def __init__(self, label_file: str, transform: Optional[Callable] = None) -> None:
        self.samples = parse_label_file(label_file)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = Image.open(path).convert("RGB")
        return (self.transform(img) if self.transform else img), target


class TarGzImageFolder(Dataset):
    """Class folders inside a ``.tar.gz`` archive (``<root>/<class>/<image>``), read into memory once.

    Gzip streams cannot be read at random offsets, so the archive is decompressed in one pass and
    the (compressed) image bytes are kept; classes are the sorted folder names, as ImageFolder.
    """

    def __init__(self, path: str, transform: Optional[Callable] = None) -> None:
        entries: List[Tuple[str, bytes]] = []
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if member.isfile() and _is_image(member.name):
                    parts = member.name.strip("/").split("/")
                    if len(parts) < 2:
                        continue  # an image at the archive root has no class folder
                    entries.append((parts[-2], archive.extractfile(member).read()))
        if not entries:
            raise ValueError(f"{path} holds no images in class folders (<class>/<image>)")
        self.classes = sorted({c for c, _ in entries})
        index = {c: i for i, c in enumerate(self.classes)}
        self._items = [(data, index[c]) for c, data in entries]
        self.transform = transform

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        data, target = self._items[i]
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return (self.transform(img) if self.transform else img), target


def open_dataset(path: str, transform: Optional[Callable] = None) -> Dataset:
    """Open evaluation data from a folder, ``.tar``, ``.tar.gz`` or label file (see module doc)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data folder or file: {path}")
    lower = path.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return TarGzImageFolder(path, transform)
    if os.path.isfile(path) and lower.endswith(LABEL_FILE_EXTENSIONS):
        return LabelFileDataset(path, transform)
    if os.path.isdir(path) or lower.endswith(".tar"):
        from timm.data import create_dataset

        if os.path.isdir(path) and not any(_is_image(f) for _, _, files in os.walk(path) for f in files):
            raise ValueError(f"data folder {path} holds no images (expected <class>/<image> files)")
        ds = create_dataset("", root=path, split="validation", transform=transform)
        if len(ds) == 0:
            raise ValueError(f"{path} holds no images in class folders (<class>/<image>)")
        return ds
    raise ValueError(
        f"cannot read {path}: pass a folder of class folders, a .tar or .tar.gz of them, "
        f"or a label file ({', '.join(LABEL_FILE_EXTENSIONS)})"
    )


def resolve_transform(model: torch.nn.Module, **overrides: Any) -> Tuple[Callable, Dict[str, Any]]:
    """timm's evaluation transform for ``model`` (``resolve_data_config`` + ``create_transform``).

    ``overrides`` (e.g. ``input_size=(3, 256, 256)``, ``crop_pct=1.0``, ``mean``, ``std``,
    ``interpolation``) take precedence over the model's pretrained config. A model built for
    another size than its pretrained config states (``img_size=384``) is fed at its built size.
    """
    from timm.data import create_transform, resolve_data_config

    from ..measure.macs import default_img_size

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "input_size" not in overrides and getattr(model, "patch_embed", None) is not None:
        built = tuple(default_img_size(model))
        cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        if cfg_size is None or tuple(cfg_size[-2:]) != built:
            overrides["input_size"] = (3, *built)
    config = resolve_data_config(overrides, model=model)
    return create_transform(**config, is_training=False), config


def subset(dataset: Dataset, limit: Optional[int] = None, seed: int = 0) -> Dataset:
    """A deterministic random subset of ``limit`` items (index order kept); all items if ``limit`` is None."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(dataset), generator=g)[:limit].sort().values.tolist()
    return Subset(dataset, picked)
