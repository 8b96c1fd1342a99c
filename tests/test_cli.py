"""The tokenslim command wires the library together: macs, benchmark, eval, sweep."""
import json

import pytest
from PIL import Image

from conftest import SMALL, make_model, read_rows
from tokenslim.cli import main
from tokenslim.loading import save_checkpoint


@pytest.fixture
def tiny_checkpoint_and_data(tmp_path):
    model = make_model("vit")
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(model, str(ckpt), "vit_tiny_patch16_224", SMALL,
                    data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    lines = []
    (tmp_path / "img").mkdir()
    for i in range(9):
        Image.new("RGB", (32, 32), (i * 25, 100, 200 - i * 20)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"./img/{i}.png, {i % 10}")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    return ckpt, tmp_path / "labels.txt"


def test_macs_command(capsys):
    main(["macs", "--model", "deit_small_patch16_224", "--settings", "r=16", "keep_rate=0.7"])
    out = capsys.readouterr().out
    assert "4.599 GMACs" in out and "2.997 GMACs" in out and "multiply-add" in out


def test_eval_command(tiny_checkpoint_and_data, tmp_path, capsys):
    ckpt, labels = tiny_checkpoint_and_data
    out_json = tmp_path / "eval.jsonl"
    main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--settings", "r=4", "--workers", "0",
          "--eval-batch-size", "4", "--quiet", "--jsonl", str(out_json)])
    rows = read_rows(out_json)
    assert [r["setting"] for r in rows] == ["none", "r=4"]
    assert rows[0]["images"] == 9 and rows[0]["run"]["data_config"]["input_size"] == [3, 32, 32]
    assert "agree" in capsys.readouterr().out


def test_eval_reuses_the_reference_logits_with_the_same_numbers(tiny_checkpoint_and_data, tmp_path):
    ckpt, labels = tiny_checkpoint_and_data
    common = ["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--eval-batch-size", "4",
              "--quiet"]
    one_pass = tmp_path / "one.jsonl"  # 'none' evaluated here: its logits are reused for r=4
    main(common + ["--settings", "r=4", "keep_rate=0.5,prune_layers=(1,)", "--jsonl", str(one_pass)])
    two_pass = tmp_path / "two.jsonl"  # 'none' replayed from the file: r=4 runs beside the reference model
    main(common + ["--jsonl", str(two_pass)])
    main(common + ["--settings", "r=4", "keep_rate=0.5,prune_layers=(1,)", "--jsonl", str(two_pass)])
    a, b = read_rows(one_pass), read_rows(two_pass)
    assert [r["setting"] for r in a] == [r["setting"] for r in b] == ["none", "r=4", "keep_rate=0.5,prune_layers=(1,)"]
    for x, y in zip(a[1:], b[1:]):
        for key in ("top1", "agreement", "kl", "top1_diff", "top1_diff_se"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), key


def test_eval_holdout_leaves_out_the_calibration_images(tiny_checkpoint_and_data, tmp_path, capsys):
    ckpt, labels = tiny_checkpoint_and_data
    out_json = tmp_path / "eval.jsonl"
    main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--holdout", "4", "--workers", "0",
          "--quiet", "--jsonl", str(out_json)])
    rows = read_rows(out_json)
    assert rows[0]["images"] == 5 and rows[0]["run"]["holdout"] == 4
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--holdout", "4", "--limit", "4"])
    assert exit_info.value.code == 2 and "--holdout" in capsys.readouterr().err


def test_sweep_and_benchmark_commands(tiny_checkpoint_and_data, tmp_path, capsys):
    ckpt, labels = tiny_checkpoint_and_data
    main(["sweep", "--checkpoint", str(ckpt), "--data", str(labels), "--settings", "r=4", "--workers", "0",
          "--quiet", "--out", str(tmp_path / "sweep"), "--bench-batch-size", "2", "--device", "cpu"])
    assert (tmp_path / "sweep" / "sweep.svg").exists()
    # --holdout selects the images for a sweep exactly as for eval (it was once silently ignored).
    main(["sweep", "--checkpoint", str(ckpt), "--data", str(labels), "--settings", "r=4", "--workers", "0",
          "--quiet", "--out", str(tmp_path / "sweep_holdout"), "--bench-batch-size", "2", "--device", "cpu",
          "--holdout", "4"])
    rows = [json.loads(line) for line in open(tmp_path / "sweep_holdout" / "sweep.jsonl")]
    assert [r["images"] for r in rows] == [5, 5] and rows[0]["run"]["holdout"] == 4
    main(["benchmark", "--model", "vit_tiny_patch16_224", "--settings", "r=8", "--batch-size", "1", "--no-latency",
          "--jsonl", str(tmp_path / "b.jsonl"), "--device", "cpu"])
    rows = [json.loads(line) for line in open(tmp_path / "b.jsonl")]
    assert [r["setting"] for r in rows] == ["none", "r=8"] and rows[1]["mac_ratio"] > 1.3
    assert "thru x" in capsys.readouterr().out
    # A checkpoint is labelled with its own architecture, not with the --model default (ViT-S).
    main(["benchmark", "--checkpoint", str(ckpt), "--settings", "r=4", "--batch-size", "1", "--no-latency",
          "--rounds", "15", "--jsonl", str(tmp_path / "c.jsonl"), "--device", "cpu"])
    rows = [json.loads(line) for line in open(tmp_path / "c.jsonl")]
    assert {r["model"] for r in rows} == {"vit_tiny_patch16_224"}
    assert capsys.readouterr().out.startswith("vit_tiny_patch16_224, batch 1")


def test_bad_setting_fails_before_work(tiny_checkpoint_and_data, capsys):
    ckpt, labels = tiny_checkpoint_and_data
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--settings", "rr=4"])
    assert exit_info.value.code == 2 and "unknown key" in capsys.readouterr().err
