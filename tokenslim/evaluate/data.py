"""Evaluation data: image folders, tar archives, label files, deterministic subsets, transforms.

Everything resolves to a map-style ``torch.utils.data.Dataset`` of ``(image, label)`` pairs:

* a folder of class sub-folders (classes in sorted order, like ImageFolder), or a ``.tar`` of them;
* a ``.tar.gz``/``.tgz`` of class folders: decompressed once into memory;
* a label file (``.txt``/``.csv``) listing ``filename label`` (space) or ``./path, label`` (comma)
  lines, paths relative to the label file.

An image that cannot be read (corrupt, truncated, missing) is an error that names it: an
evaluation never silently uses another image in its place (timm's own dataset does). Every dataset
here knows its labels without decoding an image (``targets``), so label ranges are checked before
any work.
"""
from __future__ import annotations

import io
import os
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LABEL_FILE_EXTENSIONS = (".txt", ".csv", ".lst")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data_or_path, name: str) -> Image.Image:
    """Open and fully decode an RGB image, or raise an error naming it (PIL decodes lazily, so a
    truncated file would otherwise fail later, far from its name)."""
    try:
        img = Image.open(io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {name} does not exist (was it moved or deleted?)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError(f"cannot read image {name}: {type(e).__name__}: {e}. Replace or remove the file") from None


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

    @property
    def targets(self) -> List[int]:
        return [t for _, t in self.samples]

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = decode_image(path, path)
        return (self.transform(img) if self.transform else img), target


class _ClassFolders(Dataset):
    """Class-folder data sets: labels are the sorted folder names' positions until
    :func:`match_classes` gives them the model's class indices."""

    classes: List[str]

    def set_class_indices(self, indices: Sequence[int]) -> None:
        """The images of ``classes[i]`` get label ``indices[i]`` (from the sorted positions, so repeatable)."""
        if len(indices) != len(self.classes):
            raise ValueError(f"{len(indices)} class indices for {len(self.classes)} classes")
        self.class_indices = list(indices)

    def _label(self, position: int) -> int:
        indices = getattr(self, "class_indices", None)
        return position if indices is None else indices[position]


class ImageFolderDataset(_ClassFolders):
    """A folder of class folders (``<root>/<class>/<image>``); classes are the sorted folder names."""

    def __init__(self, root: str, transform: Optional[Callable] = None) -> None:
        # Hidden folders (.ipynb_checkpoints, .git, ...) are tool litter, not classes.
        self.classes = sorted(d for d in os.listdir(root)
                              if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        self.samples: List[Tuple[str, int]] = []
        for index, cls in enumerate(self.classes):
            for folder, _, files in sorted(os.walk(os.path.join(root, cls))):
                self.samples.extend((os.path.join(folder, f), index) for f in sorted(files) if _is_image(f))
        if not self.samples:
            raise ValueError(f"data folder {root} holds no images in class folders (<class>/<image>)")
        self.transform = transform

    @property
    def targets(self) -> List[int]:
        return [self._label(t) for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = decode_image(path, path)
        return (self.transform(img) if self.transform else img), self._label(target)


class TarImageFolder(_ClassFolders):
    """Class folders inside an uncompressed ``.tar`` (random access by member offset, nothing unpacked)."""

    def __init__(self, path: str, transform: Optional[Callable] = None) -> None:
        self.path = path
        try:
            with tarfile.open(path, "r:") as archive:
                members = [m for m in archive.getmembers() if m.isfile() and _is_image(m.name)]
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"cannot read the archive {path}: {e}. Is it a complete .tar file?") from None
        classes = _archive_classes(path, [m.name for m in members])
        self.classes = sorted({c for c in classes if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self._members = [(m, index[c]) for c, m in zip(classes, members) if c is not None]
        self.transform = transform
        self._archive = None

    @property
    def targets(self) -> List[int]:
        return [self._label(t) for _, t in self._members]

    def __len__(self) -> int:
        return len(self._members)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_archive"] = None  # each worker process opens its own handle
        return state

    def __getitem__(self, i: int):
        member, target = self._members[i]
        if self._archive is None:
            self._archive = tarfile.open(self.path, "r:")
        data = self._archive.extractfile(member).read()
        img = decode_image(data, f"{member.name} in {self.path}")
        return (self.transform(img) if self.transform else img), self._label(target)


class TarGzImageFolder(_ClassFolders):
    """Class folders inside a ``.tar.gz`` archive (``<root>/<class>/<image>``), read into memory once.

    Gzip streams cannot be read at random offsets, so the archive is decompressed in one pass and
    the (compressed) image bytes are kept; classes are the sorted folder names, as ImageFolder.
    """

    def __init__(self, path: str, transform: Optional[Callable] = None) -> None:
        entries: List[Tuple[str, bytes]] = []
        try:
            with tarfile.open(path, "r:gz") as archive:
                for member in archive:
                    if member.isfile() and _is_image(member.name):
                        entries.append((member.name, archive.extractfile(member).read()))
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise ValueError(f"cannot read the archive {path}: {type(e).__name__}: {e}. Is the download complete?") from None
        classes = _archive_classes(path, [name for name, _ in entries])
        self.path = path
        self.classes = sorted({c for c in classes if c is not None})
        index = {c: i for i, c in enumerate(self.classes)}
        self._items = [(name, data, index[c]) for c, (name, data) in zip(classes, entries) if c is not None]
        self.transform = transform

    @property
    def targets(self) -> List[int]:
        return [self._label(t) for _, _, t in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int):
        name, data, target = self._items[i]
        img = decode_image(data, f"{name} in {self.path}")
        return (self.transform(img) if self.transform else img), self._label(target)


def _archive_classes(path: str, names: Sequence[str]) -> List[Optional[str]]:
    """The class folder of every image path inside an archive (``None``: not in a class folder),
    read exactly as the same files in a folder given as ``--data`` are read.

    An archive with one top-level folder is that folder (``tar czf test.tar.gz test``): its
    sub-folders are the classes. Images directly in the root are skipped, as a folder's loose
    files are, and hidden folders (``.ipynb_checkpoints``) are not classes.

    Raises:
        ValueError: no image sits in a class folder (e.g. all images in one folder), naming the archive.
    """
    parts = [n.strip("/").split("/") for n in names]
    tops = {p[0] for p in parts if len(p) > 1}
    depth = 1 if len(tops) == 1 and not any(len(p) == 1 for p in parts) else 0
    classes: List[Optional[str]] = []
    for p in parts:
        folders = p[depth:-1]
        classes.append(folders[0] if folders and not any(f.startswith(".") for f in folders) else None)
    if not any(c is not None for c in classes):
        raise ValueError(f"{path} holds no images in class folders (<class>/<image>, optionally under one top "
                         "folder), as a folder given as --data must; put the images in class folders, or list them "
                         "in a label file")
    return classes


def open_dataset(path: str, transform: Optional[Callable] = None) -> Dataset:
    """Open evaluation data from a folder, ``.tar``, ``.tar.gz`` or label file (see module doc)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such data folder or file: {path}")
    lower = path.lower()
    if lower.endswith((".tar.gz", ".tgz")):
        return TarGzImageFolder(path, transform)
    if os.path.isfile(path) and lower.endswith(LABEL_FILE_EXTENSIONS):
        return LabelFileDataset(path, transform)
    if os.path.isdir(path):
        return ImageFolderDataset(path, transform)
    if lower.endswith(".tar"):
        return TarImageFolder(path, transform)
    raise ValueError(
        f"cannot read {path}: pass a folder of class folders, a .tar or .tar.gz of them, "
        f"or a label file ({', '.join(LABEL_FILE_EXTENSIONS)})"
    )


def dataset_targets(data: Dataset) -> Optional[List[int]]:
    """The labels of ``data`` without decoding images (through :func:`subset`), or ``None`` if unknown."""
    if isinstance(data, Subset):
        inner = dataset_targets(data.dataset)
        return None if inner is None else [inner[i] for i in data.indices]
    targets = getattr(data, "targets", None)
    return list(targets) if targets is not None else None


def model_class_names(model: torch.nn.Module) -> Tuple[Optional[List[str]], bool]:
    """The model's class names in index order, and whether the model itself carries them.

    Carried: timm's ``pretrained_cfg["label_names"]`` (a tokenslim checkpoint saved with class
    names sets it). Otherwise timm's ImageNet synsets where the class count is an ImageNet
    subset's (1000, 11821, 21841, ...): a guess, used only when the folders are synsets.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names") if isinstance(cfg, dict) else getattr(cfg, "label_names", None)
    if names:
        return [str(n) for n in names], True
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        return (list(ImageNetInfo(subset).label_names()) if subset else None), False
    except Exception:  # noqa: BLE001  an unknown subset: no names
        return None, False


def match_classes(data: Dataset, model: torch.nn.Module, source: str = "the data") -> None:
    """Give a class-folder data set the model's class indices by name, or refuse it before any work.

    A folder set is read as the model's classes in sorted order (ImageFolder's rule) only when it
    has exactly the model's number of classes. Where the model has class names, folders are
    matched to them by name (a subset of the classes works). Label files carry their indices and
    are left alone.

    Raises:
        ValueError: folders that cannot be matched (a name the model does not have, or a different
            number of folders than classes on a model without names), naming them.
    """
    base = data
    while isinstance(base, Subset):
        base = base.dataset
    if not isinstance(base, _ClassFolders):
        return
    classes = base.classes
    num_classes = getattr(model, "num_classes", None)
    names, carried = model_class_names(model)
    shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
    if names:
        index = {n: i for i, n in enumerate(names)}
        unknown = [c for c in classes if c not in index]
        if not unknown:
            base.set_class_indices([index[c] for c in classes])
            return
        if carried:
            raise ValueError(f"{source}: class folder(s) {', '.join(unknown[:6])} are not among the model's class "
                             f"names ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); rename the folders "
                             "to the model's class names, or give a label file with its class indices")
    if isinstance(num_classes, int) and num_classes > 0 and len(classes) != num_classes:
        raise ValueError(f"{source}: {len(classes)} class folders ({shown}) for a model of {num_classes} classes that "
                         "carries no class names, so folders cannot be matched to classes (sorted folder i would be "
                         f"read as class i). Give all {num_classes} class folders, or a label file with the model's "
                         "class indices")


def check_labels(data: Dataset, num_classes: int, source: str = "the data") -> None:
    """Refuse labels outside ``[0, num_classes)`` before any evaluation, naming the first offender."""
    targets = dataset_targets(data)
    if targets is None or num_classes is None or num_classes <= 0:
        return
    bad = [(i, t) for i, t in enumerate(targets) if not 0 <= t < num_classes]
    if bad:
        i, t = bad[0]
        where = ""
        base = data.dataset if isinstance(data, Subset) else data
        index = data.indices[i] if isinstance(data, Subset) else i
        samples = getattr(base, "samples", None)
        if samples is not None:
            where = f" ({samples[index][0]})"
        raise ValueError(
            f"{source}: {len(bad)} labels lie outside the model's {num_classes} classes, e.g. label {t} of item "
            f"{index}{where}. Check the label file or folder against the model's classes (num_classes)"
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


def light_augmentation(config: Dict[str, Any]) -> Callable:
    """A light training transform for short distillation at the model's data config: a random crop
    of 60-100% of the image area resized to the input size, and a horizontal flip.

    Teacher and student see the same augmented image, so the augmentation only widens the set of
    inputs the student is matched on (a few thousand images go further); it changes no label.
    """
    from timm.data import create_transform

    return create_transform(config["input_size"], is_training=True, scale=(0.6, 1.0), hflip=0.5, color_jitter=0.0,
                            interpolation=config.get("interpolation", "bicubic"), mean=config["mean"],
                            std=config["std"])


def _subset_indices(n: int, limit: int, seed: int) -> List[int]:
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit].sort().values.tolist()


def subset(dataset: Dataset, limit: Optional[int] = None, seed: int = 0) -> Dataset:
    """A deterministic random subset of ``limit`` items (index order kept); all items if ``limit`` is None."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, _subset_indices(len(dataset), limit, seed))


def holdout(dataset: Dataset, limit: int, seed: int = 0) -> Dataset:
    """The items :func:`subset` with the same ``limit`` and ``seed`` leaves out (index order kept).

    Calibrate (``tokenslim tune --limit N``) on part of a labelled split and evaluate on the rest
    (``tokenslim eval --holdout N``): the two never share an image.
    """
    if limit >= len(dataset):
        raise ValueError(f"holding out {limit} of {len(dataset)} images leaves nothing to evaluate")
    taken = set(_subset_indices(len(dataset), limit, seed))
    return Subset(dataset, [i for i in range(len(dataset)) if i not in taken])


def select(dataset: Dataset, limit: Optional[int] = None, holdout_limit: Optional[int] = None,
           seed: int = 0) -> Dataset:
    """The items ``--limit N`` or ``--holdout N`` pick: :func:`holdout` given ``holdout_limit``,
    else :func:`subset` (every item when both are ``None``). Refuses both at once."""
    if holdout_limit is not None and limit is not None:
        raise ValueError("--holdout N evaluates on everything --limit N would not pick; give one of them")
    return holdout(dataset, holdout_limit, seed) if holdout_limit is not None else subset(dataset, limit, seed)

