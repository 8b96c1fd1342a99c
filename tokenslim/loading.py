"""Creating models the real way: timm pretrained weights, timm checkpoints, tokenslim checkpoints.

A tokenslim checkpoint is a ``torch.save``'d dict that carries what is needed to rebuild and
evaluate a model that has no timm pretrained config (e.g. the demo's CIFAR model): the timm model
name and constructor arguments, the state dict, the kept heads/channels of a channel-pruned
(materialised) model, and the data config (mean, std, input size, crop),
which is installed as the model's ``pretrained_cfg`` so ``resolve_data_config`` finds it.
"""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

CHECKPOINT_FORMAT = "tokenslim-checkpoint-v1"
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes",
                    "label_names")


def save_checkpoint(
    model: nn.Module,
    path: str,
    model_name: str,
    model_kwargs: Optional[Dict[str, Any]] = None,
    data_config: Optional[Dict[str, Any]] = None,
    extra: Optional[Dict[str, Any]] = None,
    settings: Optional[str] = None,
) -> None:
    """Save ``model`` with the name, constructor arguments and data config to rebuild it.

    Args:
        model: the model (its ``state_dict`` is saved; a tokenslim patch is not).
        path: output file.
        model_name: timm model name to rebuild with ``timm.create_model``.
        model_kwargs: constructor overrides (e.g. ``img_size``, ``num_classes``).
        data_config: evaluation data config: ``input_size``, ``mean``, ``std``, ``crop_pct``, ...,
            and ``label_names`` (class names in index order: class folders are then matched by name).
        extra: anything else worth keeping (training recipe, accuracy).
        settings: token-reduction settings text (e.g. ``"r=8,method=diffrate"``) that loading
            applies with :func:`tokenslim.patch`: a model tuned or recovered under a reduction is
            rebuilt with it. Channel pruning is carried by the model's kept channels instead.
    """
    if settings is not None:
        from .spec import CHANNEL_KEYS, parse_setting

        channel = [k for k in parse_setting(settings) if k in CHANNEL_KEYS]
        if channel:
            raise ValueError(f"settings saved in a checkpoint are token-reduction settings; {channel} are "
                             "carried by the materialised model itself")
    unknown = set(data_config or {}) - set(DATA_CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown data config keys {sorted(unknown)}; known: {DATA_CONFIG_KEYS}")
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model_name": model_name,
            "model_kwargs": dict(model_kwargs or {}),
            "data_config": dict(data_config or {}),
            "state_dict": model.state_dict(),
            # Kept heads/channels of a materialised model: rebuilds its smaller layers on load.
            "channels": getattr(model, "tokenslim_channels", None),
            "extra": dict(extra or {}),
            "settings": settings,
        },
        path,
    )


def _read_tokenslim_checkpoint(path: str) -> Optional[dict]:
    """The checkpoint dict if ``path`` is a tokenslim checkpoint, else ``None``.

    Raises:
        ValueError: the file cannot be read at all (truncated or corrupt), naming it.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if _readable_by_torch(path):
            return None  # readable, just not as plain tensors: let timm's loader try it
        raise ValueError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:120]}); "
                         "download or copy it again") from None
    return obj if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT else None


def _readable_by_torch(path: str) -> bool:
    import zipfile

    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def load_checkpoint(path: str) -> nn.Module:
    """Rebuild a model saved by :func:`save_checkpoint`, data config included (eval mode)."""
    obj = _read_tokenslim_checkpoint(path)
    if obj is None:
        raise ValueError(f"{path} is not a tokenslim checkpoint (saved by tokenslim.loading.save_checkpoint)")
    return _build(obj, path)


def _build(obj: dict, path: str, apply_settings: bool = True) -> nn.Module:
    import timm

    model = timm.create_model(obj["model_name"], pretrained=False, **obj["model_kwargs"])
    if obj.get("channels"):
        from .adapters.timm_channels import restore_channels

        restore_channels(model, obj["channels"])
    _load_state(model, obj["state_dict"], path, obj["model_name"])
    if obj["data_config"]:
        model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", None) or {}), **obj["data_config"]}
    if obj.get("settings") and apply_settings:
        from .spec import apply_setting, parse_setting

        apply_setting(model, parse_setting(obj["settings"]))
    return model.eval()


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str, name: str) -> None:
    from .merge_policy import attach_policy, has_policy_state

    if has_policy_state(state):
        attach_policy(model, state)  # a learned merge policy travels with the weights
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line or "Missing" in line
                       or "Unexpected" in line), first[0] if first else "")
        raise ValueError(
            f"checkpoint {path} does not fit model {name}: {detail.rstrip('.')}. Check the model name and its "
            "arguments (num_classes, img_size, ...) against those the checkpoint was trained with."
        ) from None


HUB_HOST = "huggingface.co"


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the weights hub opens within ``timeout`` seconds."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub_if_unreachable(pretrained: bool) -> Iterator[None]:
    """Without a network, let huggingface_hub answer from its cache at once instead of retrying for
    about a minute before failing (cached weights still load)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    if not pretrained or constants.HF_HUB_OFFLINE or hub_reachable():
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_baseline(
    name: Optional[str] = None,
    pretrained: bool = False,
    checkpoint_path: Optional[str] = None,
    **kwargs: Any,
) -> Tuple[nn.Module, Optional[str]]:
    """The model *without* the token-reduction settings its checkpoint carries, and those settings.

    A recovered or tuned checkpoint loads already reduced through :func:`create_model`; comparing
    it with "the unpatched model" would compare it with itself. The tools load it through this
    function instead: the weights unreduced are the baseline and the carried settings (settings
    text, ``None`` when there are none) are evaluated as the row they name. Channel pruning stays:
    it is the architecture of the saved weights.
    """
    return _create(name, pretrained, checkpoint_path, False, **kwargs)


def architecture(model: nn.Module, default: Optional[str] = None) -> Optional[str]:
    """The timm architecture name ``model`` was built as (its ``pretrained_cfg``), else ``default``."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or default


def _check_checkpoint_path(path: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"--checkpoint {path} is a folder; pass the checkpoint file inside it "
                                "(e.g. a .pth saved by tokenslim or timm)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")


def _check_name(name: Optional[str], obj: dict, path: str) -> None:
    """A model name given beside a tokenslim checkpoint must be the one it builds."""
    if name is not None and name != obj["model_name"]:
        raise ValueError(f"checkpoint {path} builds {obj['model_name']}, not {name}: leave out the model name "
                         "(a tokenslim checkpoint names its own) or pass the matching one")


def create_model(
    name: Optional[str] = None,
    pretrained: bool = False,
    checkpoint_path: Optional[str] = None,
    **kwargs: Any,
) -> nn.Module:
    """Create a model in eval mode from a timm name, pretrained weights and/or a checkpoint file.

    * ``checkpoint_path`` to a tokenslim checkpoint: rebuilt from it (``name`` may be omitted, or
      must be the architecture it builds), with the token-reduction settings it carries applied
      (:func:`load_baseline` leaves them off).
    * ``checkpoint_path`` to a timm/PyTorch state dict: ``timm.create_model(name, checkpoint_path=...)``.
    * ``pretrained=True``: timm downloads (or finds cached) weights; without network the error
      says how to pass a local checkpoint instead.
    """
    return _create(name, pretrained, checkpoint_path, True, **kwargs)[0]


def _create(name: Optional[str], pretrained: bool, checkpoint_path: Optional[str], apply_settings: bool,
            **kwargs: Any) -> Tuple[nn.Module, Optional[str]]:
    """The model and the settings text its tokenslim checkpoint carries (applied or not)."""
    import timm

    if checkpoint_path is not None:
        _check_checkpoint_path(checkpoint_path)
        obj = _read_tokenslim_checkpoint(checkpoint_path)
        if obj is not None:
            _check_name(name, obj, checkpoint_path)
            return _build(obj, checkpoint_path, apply_settings), obj.get("settings") or None
        if name is None:
            raise ValueError(f"{checkpoint_path} is a plain state dict: also pass the timm model name")
        model = timm.create_model(name, pretrained=False, **kwargs)
        from timm.models import load_checkpoint as timm_load

        try:
            timm_load(model, checkpoint_path)
        except RuntimeError as e:
            raise ValueError(
                f"checkpoint {checkpoint_path} does not fit model {name}: {str(e).strip().splitlines()[-1]}. "
                "Check the model name and its arguments (num_classes, img_size, ...)."
            ) from None
        return model.eval(), None
    if name is None:
        raise ValueError("pass a timm model name or a checkpoint path")
    try:
        with _offline_hub_if_unreachable(pretrained):
            return timm.create_model(name, pretrained=pretrained, **kwargs).eval(), None
    except (OSError, ConnectionError, RuntimeError) as e:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for {name} ({type(e).__name__}: {str(e)[:200]}). Without "
            "network access, download the weights elsewhere and pass the file: "
            "checkpoint_path=... in Python, --checkpoint PATH on the command line."
        ) from e
