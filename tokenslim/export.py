"""``tokenslim.export``: a reduced model out of eager PyTorch, to ONNX (run in ONNX Runtime) or
``torch.export``, checked against the eager model it came from.

Every token-reduction setting tokenslim has keeps shapes static: each method removes a fixed number
of tokens per block, so ToMe, the other methods, pruning, prune+merge and materialised channels all
export. What the graph needs is ops with an ONNX form: matching is gathers and a stable descending
order (:mod:`tokenslim.ops.sorting` computes it from comparisons while exporting), merging is a
sum-scatter (``ScatterElements`` with ``add``, opset 16), attention is traced through the math
kernel of ``scaled_dot_product_attention``. Eager results are unchanged.

The exported file carries what the tools need to use it alone: the settings text, the data config,
the timm architecture and the tokenslim release (ONNX ``metadata_props``; an ``extra_files`` entry
for ``torch.export``), and the name of the unpatched baseline exported beside it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

FORMATS = ("onnx", "torch_export")
DEFAULT_OPSET = 18
TOLERANCE = 1e-4
METADATA_KEY = "tokenslim"


@dataclass
class ExportResult:
    """What :func:`export` wrote and how closely it matches the eager model.

    Attributes:
        path: the exported file.
        format: ``"onnx"`` or ``"torch_export"``.
        max_abs_diff: the largest ``|exported - eager|`` on the outputs, by batch size checked.
        metadata: what the file carries (settings, data config, architecture, release).
    """

    path: str
    format: str
    max_abs_diff: Dict[int, float] = field(default_factory=dict)
    metadata: Dict[str, Any] = field(default_factory=dict)


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export and ONNX Runtime need the onnx extra: pip install 'tokenslim[onnx]' "
                          "(onnx, onnxscript, onnxruntime); format='torch_export' needs nothing extra") from None


def check_exportable(model: nn.Module) -> None:
    """Refuse, before any work, what cannot be exported, naming the reason.

    Raises:
        TypeError: a model of another framework than timm (their adapters are not export-tested).
        ValueError: a model with masks on inputs or channels that are not materialised.
    """
    from .adapters.registry import adapter_for

    adapter = adapter_for(model).__name__.rsplit(".", 1)[-1]
    if adapter not in ("timm_vit", "timm_eva"):
        raise TypeError(f"export covers timm ViTs; {type(model).__name__} goes through the {adapter} adapter, whose "
                        "export is not tested yet: export the equivalent timm model (the same weights load into it)")
    from .adapters.timm_channels import has_masks

    if has_masks(model):
        raise ValueError("the model carries channel masks (materialize=False): masks export as multiplications and "
                         "gain nothing; materialise them first (tokenslim.materialize(model))")


def metadata_of(model: nn.Module, settings: Optional[str] = None, baseline: Optional[str] = None) -> Dict[str, Any]:
    """What an exported file carries about ``model``."""
    from .versions import __version__
    from .loading import DATA_CONFIG_KEYS, architecture

    cfg = getattr(model, "pretrained_cfg", None) or {}
    if settings is None:
        reduction = getattr(model, "tokenslim", None)
        settings = _settings_text(reduction) if reduction is not None else "none"
    data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in DATA_CONFIG_KEYS}
    data_config.setdefault("num_classes", getattr(model, "num_classes", None))
    return {"settings": settings, "data_config": data_config, "architecture": architecture(model),
            "tokenslim": __version__, "baseline": baseline, "channels": getattr(model, "tokenslim_channels", None)}


def _settings_text(reduction) -> str:
    d = reduction.as_dict()
    keep = {"r": d["r"], "method": d["method"]}
    if d["keep_rate"] is not None:
        keep.update(keep_rate=d["keep_rate"], prune_layers=tuple(d["prune_layers"]), fuse_pruned=d["fuse_pruned"])
    if d["threshold"] is not None:
        keep["threshold"] = d["threshold"]
    if d["margin"] is not None:
        keep["margin"] = d["margin"]
    if d.get("rope") is not None:
        keep["rope"] = d["rope"]
    from .spec import format_setting

    return format_setting({k: (tuple(v) if isinstance(v, list) and k == "r" else v) for k, v in keep.items()})


def export(
    model: nn.Module,
    example: torch.Tensor,
    path: str,
    format: str = "onnx",
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    check_batches: Sequence[int] = (1, 3),
    tolerance: float = TOLERANCE,
    metadata: Optional[Dict[str, Any]] = None,
) -> ExportResult:
    """Export ``model`` (patched or not) and check the file against the eager model.

    Args:
        model: a timm ViT, patched with any token-reduction setting and/or materialised channels.
        example: an input batch ``[B, 3, H, W]`` (its size fixes H and W).
        path: the file to write (``.onnx``, or ``.pt2`` for ``torch_export``).
        format: ``"onnx"`` (checked through ONNX Runtime) or ``"torch_export"`` (an ``ExportedProgram``).
        dynamic_batch: the batch dimension stays free (checked at every size of ``check_batches``).
        opset: the ONNX opset (>= 16 for ScatterElements with ``add``).
        check_batches: batch sizes the exported file is run at and compared with the eager model.
        tolerance: the largest absolute output difference accepted (fp32).
        metadata: what the file carries; :func:`metadata_of` by default.

    Raises:
        ValueError: an unknown format, an opset below 16, or an exported file whose outputs differ
            from the eager model's by more than ``tolerance`` (the file is removed).
        TypeError: a model :func:`check_exportable` refuses.
        ImportError: ONNX without the ``onnx`` extra.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "onnx":
        _require_onnx()
        if opset < 16:
            raise ValueError(f"opset {opset}: merging needs ScatterElements with reduction 'add' (opset 16 or later)")
    check_exportable(model)
    if not dynamic_batch:
        check_batches = [example.shape[0]]
    elif example.shape[0] < 2:
        # torch.export specialises a dimension whose example size is 1: the graph would take batch 1 only.
        raise ValueError(f"an example batch of {example.shape[0]} fixes the exported graph at that batch; trace "
                         "with a batch of 2 or more (--example-batch 2), or fix the batch on purpose "
                         "(dynamic_batch=False, --static-batch)")
    meta = dict(metadata or metadata_of(model))
    model = model.eval()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    # The math kernel is what the exporters decompose attention into; tracing through it keeps the
    # layouts the graph records the ones it will run with.
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        if format == "onnx":
            torch.onnx.export(model, (example,), path, dynamo=True, opset_version=opset, dynamic_shapes=dynamic,
                              verbose=False)
            _write_onnx_metadata(path, meta)
        else:
            program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
            torch.export.save(program, path, extra_files={METADATA_KEY: json.dumps(meta)})
    result = ExportResult(path, format, metadata=meta)
    try:
        runner = load(path)
        for b in check_batches:
            x = torch.randn(b, *example.shape[1:], generator=torch.Generator().manual_seed(b), dtype=example.dtype)
            with torch.no_grad():
                want = model(x).float()
                got = runner(x).float()
            result.max_abs_diff[b] = float((got - want).abs().max())
    except Exception as e:
        _remove_export(path)  # a file that failed its own check is never left behind
        raise ValueError(f"the exported {format} model could not be checked against the eager one "
                         f"({type(e).__name__}: {str(e)[:300]}); nothing was kept") from e
    worst = max(result.max_abs_diff.values())
    if not worst <= tolerance:
        _remove_export(path)
        raise ValueError(f"the exported {format} model differs from the eager one by {worst:.3g} (> {tolerance}) at "
                         f"batch sizes {dict(result.max_abs_diff)}; nothing was kept. Please report the setting "
                         f"{meta.get('settings')}")
    return result


def _remove_export(path: str) -> None:
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)


def _write_onnx_metadata(path: str, meta: Dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(path, load_external_data=True)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    # One self-contained file: the exporter's external .onnx.data is folded back in (models under
    # ONNX's 2 GB protobuf limit need none), so no unused weights file is left beside it.
    onnx.save(proto, path, save_as_external_data=False)
    if os.path.exists(path + ".data"):
        os.remove(path + ".data")


def _not_an_export(path: str, expected: str, why: str) -> ValueError:
    return ValueError(f"{path} is not {expected} ({why}); give the model.onnx that tokenslim export wrote, "
                      "or export again")


def read_metadata(path: str) -> Dict[str, Any]:
    """What an exported file carries (see :func:`metadata_of`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such exported model: {path}")
    if path.endswith(".onnx"):
        _require_onnx()
        import onnx

        try:
            proto = onnx.load(path, load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends: truncated, or not ONNX at all
            raise _not_an_export(path, "a readable ONNX model", f"{type(e).__name__}: {str(e)[:120] or 'cannot parse'}"
                                 "; truncated, or another kind of file") from None
        for entry in proto.metadata_props:
            if entry.key == METADATA_KEY:
                return json.loads(entry.value)
        raise ValueError(f"{path} carries no tokenslim metadata: export it with tokenslim export")
    extra = {METADATA_KEY: ""}
    torch.export.load(path, extra_files=extra)
    if not extra[METADATA_KEY]:
        raise ValueError(f"{path} carries no tokenslim metadata: export it with tokenslim export")
    return json.loads(extra[METADATA_KEY])


class OnnxModel(nn.Module):
    """An ONNX Runtime session as a module: ``forward`` takes and returns torch tensors, and the
    data config the file carries is its ``pretrained_cfg``, so tokenslim's evaluation and timing
    treat it like the eager model (CPU, float32)."""

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        super().__init__()
        _require_onnx()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # No busy-waiting after a run: spinning threads would steal the CPU from whatever runs next
        # (the interleaved timer's other models, the data loader).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        if not path.endswith(".onnx"):
            raise _not_an_export(path, "an ONNX model", "its name does not end in .onnx; a .pt2 program is loaded "
                                 "with tokenslim.export.load")
        self.metadata = read_metadata(path)  # first: a file that is not ONNX is named, not a runtime traceback
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  onnxruntime raises its own exception types
            raise _not_an_export(path, "an ONNX model ONNX Runtime can run", f"{type(e).__name__}: "
                                 f"{str(e)[:200]}") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.static_batch: Optional[int] = first.shape[0] if isinstance(first.shape[0], int) else None
        config = dict(self.metadata.get("data_config") or {})
        self.pretrained_cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
        self.num_classes = config.get("num_classes")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs for ``x``; a file exported with a fixed batch runs ``x`` in chunks of that batch
        (the last one padded), so evaluation takes any batch size."""
        x = x.detach().to("cpu", torch.float32).contiguous()
        b = self.static_batch
        if b is None or x.shape[0] == b:
            return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
        outs = []
        for start in range(0, x.shape[0], b):
            chunk = x[start:start + b]
            n = chunk.shape[0]
            if n < b:
                chunk = torch.cat([chunk, chunk[-1:].expand(b - n, *chunk.shape[1:])])
            outs.append(torch.from_numpy(self.session.run(None, {self.input_name: chunk.contiguous().numpy()})[0])[:n])
        return torch.cat(outs)

    def __getstate__(self):
        raise TypeError("an ONNX Runtime session cannot be pickled; use num_workers=0 or load it in each process")


class ExportedProgramModel(nn.Module):
    """A ``torch.export`` program loaded back as a module, with the metadata it carries."""

    def __init__(self, path: str) -> None:
        super().__init__()
        extra = {METADATA_KEY: ""}
        self.program = torch.export.load(path, extra_files=extra)
        self.module_ = self.program.module()
        self.metadata = json.loads(extra[METADATA_KEY]) if extra[METADATA_KEY] else {}
        config = dict(self.metadata.get("data_config") or {})
        self.pretrained_cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
        self.num_classes = config.get("num_classes")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module_(x)


def load(path: str) -> nn.Module:
    """An exported file as a module: :class:`OnnxModel` for ``.onnx``, else the ``torch.export`` program."""
    return OnnxModel(path) if path.endswith(".onnx") else ExportedProgramModel(path)


def baseline_path(path: str) -> str:
    """The unpatched model exported beside ``path`` (named in its metadata)."""
    meta = read_metadata(path)
    name = meta.get("baseline")
    if not name:
        raise ValueError(f"{path} names no exported baseline; export with tokenslim export, which writes one")
    full = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(full):
        raise FileNotFoundError(f"{path} names its baseline {name}, which is not beside it ({full})")
    return full


__all__ = ["ExportResult", "FORMATS", "OnnxModel", "baseline_path", "check_exportable", "export", "load",
           "metadata_of", "read_metadata"]
