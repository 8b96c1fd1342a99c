"""Sweeps (Pareto front, outputs) and the offline demo end to end on a tiny budget."""
import csv
import json

import pytest
import torch

from conftest import make_model
from tokenslim.demo import run_demo
from tokenslim.demo.shapes import CLASSES, make_shapes
from tokenslim.sweep import pareto_front, pareto_svg, run_sweep, write_outputs


def test_pareto_front():
    pts = [(1.0, 80.0), (1.5, 79.0), (1.4, 78.0), (2.0, 70.0), (1.5, 79.0), (0.9, 80.0)]
    assert pareto_front(pts) == [True, True, False, True, True, False]


def test_shapes_are_balanced_and_deterministic():
    a, b = make_shapes(200, seed=3), make_shapes(200, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert torch.bincount(a.tensors[1]).tolist() == [20] * len(CLASSES)
    assert not torch.equal(make_shapes(200, seed=4).tensors[0], a.tensors[0])


def test_sweep_rows_and_outputs(tmp_path):
    model = make_model("vit")
    data = [(torch.randn(3, 32, 32), i % 10) for i in range(24)]
    rows = run_sweep(model, ["r=8", "keep_rate=0.5,prune_layers=(1,),fuse_pruned=True"], data,
                     eval_kwargs=dict(batch_size=8, num_workers=0, device="cpu", progress=False),
                     bench_kwargs=dict(batch_size=4, rounds=15, device="cpu", latency=False))
    assert [r["setting"] for r in rows] == ["none", "r=8", "keep_rate=0.5,prune_layers=(1,),fuse_pruned=True"]
    assert rows[0]["agreement"] is None and rows[1]["agreement"] is not None
    assert all(r["images"] == 24 for r in rows) and rows[1]["mac_ratio"] > 1.3
    paths = write_outputs(rows, str(tmp_path), "s", title="t")
    with open(paths["csv"]) as f:
        assert [r["setting"] for r in csv.DictReader(f)] == [r["setting"] for r in rows]
    with open(paths["jsonl"]) as f:
        assert [json.loads(line)["top1"] for line in f] == [r["top1"] for r in rows]
    svg = open(paths["svg"]).read()
    assert svg.startswith("<svg") and svg.count("<circle") == 3 and "r=8" in svg


def test_demo_runs_offline_end_to_end(tmp_path, capsys):
    rows = run_demo(str(tmp_path), settings=["r=4", "mlp_pruned=0.25"], train_images=256, test_images=60,
                    epochs=1, rounds=15, batch_size=8)
    assert [r["setting"] for r in rows] == ["none", "r=4", "mlp_pruned=0.25"]
    assert (tmp_path / "demo_vit.pth").exists() and (tmp_path / "demo_sweep.svg").exists()
    out = capsys.readouterr().out
    assert "r=4" in out and "Pareto" in out
    # A second run reuses the checkpoint instead of training again.
    rows2 = run_demo(str(tmp_path), settings=["r=4"], train_images=256, test_images=60, epochs=1,
                     rounds=15, batch_size=8)
    err = capsys.readouterr().err
    assert "reusing the trained model" in err and "epoch 1/1" not in err
    assert rows2[0]["top1"] == rows[0]["top1"]


def test_pareto_png_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    from tokenslim.sweep import pareto_png

    rows = [{"setting": s, "throughput_ratio": x, "throughput_ratio_low": x - 0.05, "throughput_ratio_high": x + 0.05,
             "top1": y, "pareto": p} for s, x, y, p in (("none", 1.0, 80.0, True), ("r=4", 1.3, 79.0, True),
                                                      ("r=2", 1.1, 78.0, False))]
    path = tmp_path / "p.png"
    assert pareto_png(rows, str(path), "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_uses_the_shipped_checkpoint_when_its_recipe_matches(tmp_path, capsys, monkeypatch):
    import tokenslim.demo as demo

    # The real shipped model: trained with the demo's defaults, loadable offline.
    recipe = torch.load(demo.PACKAGED_CHECKPOINT, weights_only=True)["extra"]["recipe"]
    assert (recipe["train_images"], recipe["epochs"]) == (12000, 6) and recipe["test_top1"] > 90
    # A stand-in shipped file for a tiny recipe, so the test stays fast.
    run_demo(str(tmp_path / "a"), settings=["r=4"], train_images=128, test_images=40, epochs=1, rounds=15,
             batch_size=8)
    monkeypatch.setattr(demo, "PACKAGED_CHECKPOINT", str(tmp_path / "a" / "demo_vit.pth"))
    capsys.readouterr()
    run_demo(str(tmp_path / "b"), settings=["r=4"], train_images=128, test_images=40, epochs=1, rounds=15,
             batch_size=8)
    err = capsys.readouterr().err
    assert "using the demo model shipped with tokenslim" in err and "epoch 1/1" not in err
    run_demo(str(tmp_path / "c"), settings=["r=4"], train_images=128, test_images=40, epochs=2, rounds=15,
             batch_size=8)  # another recipe: trained here
    assert "epoch 2/2" in capsys.readouterr().err


def test_pareto_plot_shows_the_useful_range_and_keeps_labels_apart(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenslim.sweep import _place_labels, pareto_png, useful_range

    low, high = useful_range([75.8, 75.5, 74.9, 38.7])  # one collapsed setting
    assert 62.0 < low < 64.0 and high > 75.8
    assert useful_range([75.8, 75.0])[0] < 75.0  # a small spread is shown whole
    fig, ax = plt.subplots()
    ax.set_xlim(0.9, 2.1)
    ax.set_ylim(74, 76)
    points = [(1.0 + 0.01 * i, 75.0 + 0.01 * i) for i in range(6)]  # six nearly coincident points
    boxes = _place_labels(ax, fig, points, [f"r={i},method=diffrate" for i in range(6)])
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
    rows = [{"setting": s, "top1": t, "throughput_ratio": x, "throughput_ratio_low": x - 0.05,
             "throughput_ratio_high": x + 0.05, "pareto": p}
            for s, t, x, p in (("none", 75.8, 1.0, True), ("r=8", 75.3, 1.4, True), ("mlp_pruned=0.5", 38.7, 1.4, False))]
    assert pareto_png(rows, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 1000
