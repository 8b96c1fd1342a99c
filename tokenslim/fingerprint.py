"""What makes two runs the same run: one fingerprint for every resumable job.

A sweep, an ``eval --json`` file, a tune journal and a recovery state are resumed only when the
rerun is the *same* run: the same model weights (by content, not by path), the same settings, the
same data (its file list or archive content, and the items picked from it) and the same options
that change a result, written by the same tokenslim release. :func:`fingerprint` builds that
description; :func:`check_same_run` compares a saved one with the current one and refuses, before
any work, naming what differs and how to start fresh.

Pure functions of their inputs (tensors, datasets, dicts): no file is written here.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

_CHUNK = 1 << 20


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()[:16]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # The raw bytes of any dtype (bfloat16 and float8 included, which numpy cannot hold).
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(model: nn.Module) -> str:
    """A short hash of ``model``'s state dict as loaded: names, dtypes, shapes and values.

    Two models with the same architecture but other weights (another checkpoint, one fine-tuned
    step) get different digests; the same weights loaded from another path get the same one.
    """
    def parts():
        for name, value in sorted(model.state_dict().items()):
            yield f"{name}|{value.dtype}|{tuple(value.shape)}|".encode()
            if value.device.type != "meta":
                yield _tensor_bytes(value)
    return _digest(parts())


def file_digest(path: str) -> str:
    """A short hash of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _items_of(data: Dataset) -> Optional[Iterable[bytes]]:
    """What identifies each item of one of tokenslim's readers (name, size or bytes, label)."""
    samples = getattr(data, "samples", None)
    if samples is not None:  # a folder or a label file: the file list, each file's size, its label
        root = os.path.commonpath([p for p, _ in samples]) if samples else ""
        return (f"{os.path.relpath(p, root)}|{os.path.getsize(p) if os.path.exists(p) else -1}|{t}\n".encode()
                for p, t in samples)
    items = getattr(data, "_items", None)
    if items is not None:  # a .tar.gz held in memory: names, bytes and labels
        return (part for name, raw, t in items for part in (f"{name}|{t}|".encode(), raw))
    members = getattr(data, "_members", None)
    if members is not None:  # an uncompressed .tar: its index (names, sizes, offsets), not a re-read of its bytes
        return (f"{m.name}|{m.size}|{m.offset_data}|{t}\n".encode() for m, t in members)
    return None


def data_digest(data: Dataset) -> Dict[str, Any]:
    """The identity of a data set: its items' digest, the picked indices' digest and the transform.

    Recognises tokenslim's readers (folders, label files, ``.tar``, ``.tar.gz``) through
    :class:`torch.utils.data.Subset` picks; any other data set is described by its class and
    length only (say so in the returned ``"items"``).
    """
    indices = None
    base = data
    while isinstance(base, Subset):
        indices = list(base.indices) if indices is None else [base.indices[i] for i in indices]
        base = base.dataset
    items = _items_of(base)
    described = {"images": len(data),
                 "items": _digest(items) if items is not None else f"{type(base).__name__}[{len(base)}]",
                 "picked": _digest([json.dumps(indices).encode()]) if indices is not None else "all"}
    transform = getattr(base, "transform", None)
    if transform is not None:
        described["transform"] = _digest([repr(transform).encode()])
    return described


def fingerprint(model: Optional[nn.Module] = None, data: Optional[Dataset] = None, /,
                **options: Any) -> Dict[str, Any]:
    """The description a resumable job stores and compares.

    Args:
        model: the model whose weights define the run (the unpatched model, or the teacher).
        data: the data set the run reads, after ``--limit``/``--holdout`` picks.
        options: every other option that changes a result (settings, batch size, seed, a model
            name, ...); JSON-serialisable values. ``weights`` and ``data`` are taken.

    Returns:
        A JSON-serialisable dict: ``weights``, ``data``, ``tokenslim`` (the release) and the options.
    """
    from .versions import __version__

    out: Dict[str, Any] = {"tokenslim": __version__}
    if model is not None:
        out["weights"] = weights_digest(model)
    if data is not None:
        out["data"] = data_digest(data)
    taken = sorted(set(options) & {"tokenslim", "weights", "data"})
    if taken:
        raise ValueError(f"fingerprint options may not be named {taken}: those keys describe the weights and data")
    out.update(options)
    return json.loads(json.dumps(out))  # tuples become lists: compare like what is read back


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> Dict[str, Any]:
    """The keys whose values differ between two fingerprints, with ``(saved, current)`` values."""
    current = json.loads(json.dumps(current))
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_same_run(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], where: str,
                   fresh: str = "pass --fresh to start over, or write to another output") -> None:
    """Refuse to resume ``where`` unless its saved fingerprint equals ``current``.

    Raises:
        ValueError: naming the file, each difference (``weights``: the model's weights differ) and
            how to start fresh. A file without a fingerprint (written by an older release) is
            refused too: its run cannot be known.
    """
    if saved is None:
        raise ValueError(f"{where} holds results without a run fingerprint (an older tokenslim wrote it), so "
                         f"it cannot be told whether they belong to this run; {fresh}")
    changed = differences(saved, current)
    if changed:
        listed = "; ".join(f"{k}: {_show(old)} then, {_show(new)} now" for k, (old, new) in changed.items())
        raise ValueError(f"{where} belongs to another run ({listed}); resuming would mix two runs. {fresh[:1].upper() + fresh[1:]}")


__all__ = ["check_same_run", "data_digest", "differences", "file_digest", "fingerprint", "weights_digest"]
