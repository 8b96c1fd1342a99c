"""Export: every static-shape setting to ONNX (run in ONNX Runtime) and torch.export, equal to the
eager model at two batch sizes, carrying its metadata; clear refusals."""
import builtins
import copy

import pytest
import torch

import tokenslim
from conftest import SMALL, images, make_model
from tokenslim.export import check_exportable, export, load, read_metadata
from tokenslim.loading import save_checkpoint
from tokenslim.spec import apply_setting, parse_setting

SETTINGS = ["r=0", "r=4", "r=(6,-1)", "r=4,method=mlerp", "r=4,method=pitome", "r=4,method=diffrate",
            "r=4,method=ppt,threshold=0.001", "r=4,method=atc", "keep_rate=0.7,prune_layers=(1,)",
            "r=2,keep_rate=0.7,prune_layers=(1,),fuse_pruned=true", "r=4,mlp_pruned=0.25,heads_pruned=0.34"]


def _small():
    return make_model("vit", depth=3)


@pytest.mark.parametrize("text", SETTINGS)
def test_onnx_export_equals_eager_at_two_batch_sizes(tmp_path, text):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = apply_setting(_small(), parse_setting(text))
    result = export(model, images(2), str(tmp_path / "m.onnx"), check_batches=(1, 5))
    assert set(result.max_abs_diff) == {1, 5} and max(result.max_abs_diff.values()) <= 1e-4
    runner = load(str(tmp_path / "m.onnx"))
    x = images(3, seed=9)
    torch.testing.assert_close(runner(x), model(x).detach(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("text", SETTINGS)
def test_torch_export_equals_eager_at_two_batch_sizes(tmp_path, text):
    model = apply_setting(_small(), parse_setting(text))
    result = export(model, images(2), str(tmp_path / "m.pt2"), format="torch_export", check_batches=(1, 5))
    assert max(result.max_abs_diff.values()) <= 1e-4


def test_eager_results_are_bit_for_bit_what_they_were():
    # The export-friendly ordering is used only while exporting: eager keeps torch.sort(stable=True).
    from unittest import mock

    import tokenslim.ops.sorting as sorting

    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 5.0, 2.0]]).repeat(2, 1)
    with mock.patch.object(sorting, "_exporting", return_value=True):
        exported = sorting.argsort_desc_stable(x)
    assert torch.equal(exported, torch.sort(x, dim=-1, descending=True, stable=True).indices)
    assert torch.equal(sorting.argsort_desc_stable(x), torch.sort(x, dim=-1, descending=True, stable=True).indices)


def test_torch_export_round_trip_and_metadata(tmp_path):
    model = tokenslim.patch(_small(), r=4, method="diffrate")
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    result = export(model, images(2), str(tmp_path / "m.pt2"), format="torch_export")
    assert max(result.max_abs_diff.values()) <= 1e-5
    meta = read_metadata(str(tmp_path / "m.pt2"))
    assert meta["settings"] == "r=4,method='diffrate'" and meta["data_config"]["mean"] == [0.5] * 3
    assert meta["architecture"] == "vit_tiny_patch16_224"
    again = load(str(tmp_path / "m.pt2"))
    x = images(4, seed=3)
    torch.testing.assert_close(again(x), model(x).detach(), atol=1e-5, rtol=0)


def test_refusals(tmp_path, monkeypatch):
    masked = apply_setting(_small(), parse_setting("mlp_pruned=0.25,materialize=false"))
    with pytest.raises(ValueError, match="materialise them first"):
        check_exportable(masked)
    real_import = builtins.__import__

    def no_onnx(name, *a, **k):
        if name.startswith("onnx"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(ImportError, match=r"pip install 'tokenslim\[onnx\]'"):
        export(_small(), images(2), str(tmp_path / "m.onnx"))
    monkeypatch.setattr(builtins, "__import__", real_import)
    pytest.importorskip("onnxscript")
    with pytest.raises(ValueError, match="opset 15"):
        export(_small(), images(2), str(tmp_path / "m.onnx"), opset=15)
    pytest.importorskip("transformers")
    from test_hf_vit import hf_models

    with pytest.raises(TypeError, match="export covers timm ViTs"):
        check_exportable(tokenslim.patch(hf_models()["ViTModel"]().eval(), r=2))


def test_export_command_eval_and_benchmark_through_onnx_runtime(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from PIL import Image

    from tokenslim.cli import main

    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(_small(), str(ckpt), "vit_tiny_patch16_224", {**SMALL, "depth": 3},
                    data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    main(["export", "--checkpoint", str(ckpt), "--settings", "r=4", "--out", str(tmp_path / "x"), "--quiet"])
    out = capsys.readouterr().out
    assert "exported r=4" in out and "exported none" in out and (tmp_path / "x" / "baseline.onnx").is_file()
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(6):
        Image.new("RGB", (32, 32), (i * 40, 90, 200 - i * 30)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"./img/{i}.png, {i % 10}")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    main(["eval", "--onnx", str(tmp_path / "x" / "model.onnx"), "--data", str(tmp_path / "labels.txt"), "--quiet",
          "--jsonl", str(tmp_path / "e.jsonl")])
    eager = copy.deepcopy(capsys.readouterr().out)
    assert "r=4" in eager and "none" in eager
    main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "labels.txt"), "--quiet", "--settings", "r=4"])
    same = capsys.readouterr().out
    pick = lambda text: [line.split()[1:4] for line in text.splitlines() if line.startswith(("none", "r=4"))]  # noqa
    assert pick(eager) == pick(same)  # top-1, top-5 and agreement through ONNX Runtime equal eager
    main(["benchmark", "--onnx", str(tmp_path / "x" / "model.onnx"), "--batch-size", "2", "--no-latency", "--quiet"])
    assert "ONNX Runtime" in capsys.readouterr().out
