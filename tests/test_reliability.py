"""Nothing lost, nothing silent: resumable sweeps and evaluations, early and clear errors."""
import gzip
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

import tokenslim
import tokenslim.sweep as sweep_module
from conftest import SMALL, make_model, read_rows
from tokenslim.cli import main
from tokenslim.evaluate import evaluate, open_dataset, resolve_transform
from tokenslim.loading import save_checkpoint
from tokenslim.spec import parse_setting

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}


@pytest.fixture
def tiny(tmp_path):
    """A tiny checkpoint and a label file of 9 images."""
    ckpt = tmp_path / "tiny.pth"
    save_checkpoint(make_model("vit"), str(ckpt), "vit_tiny_patch16_224", SMALL, data_config=DATA_CONFIG)
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(9):
        Image.new("RGB", (32, 32), (i * 25, 100, 200 - i * 20)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"./img/{i}.png, {i % 10}")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    return ckpt, tmp_path / "labels.txt"


def _sweep_args(ckpt, labels, out, *settings):
    return ["sweep", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--quiet",
            "--out", str(out), "--bench-batch-size", "2", "--rounds", "15", "--device", "cpu",
            "--settings", *settings]


def test_sweep_killed_midway_resumes_without_recomputing(tiny, tmp_path, monkeypatch, capsys):
    ckpt, labels = tiny
    out = tmp_path / "sweep"
    real_evaluate = sweep_module.evaluate
    evaluated = []

    def counting(model, data, label="", **kw):
        evaluated.append(label)
        if label == "r=6" and interrupt:
            raise KeyboardInterrupt  # Ctrl-C while the third setting runs
        return real_evaluate(model, data, label=label, **kw)

    monkeypatch.setattr(sweep_module, "evaluate", counting)
    interrupt = True
    with pytest.raises(SystemExit) as exit_info:
        main(_sweep_args(ckpt, labels, out, "r=2", "r=4", "r=6"))
    assert exit_info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    done = [json.loads(line)["setting"] for line in open(out / "sweep.jsonl")]
    assert done == ["none", "r=2", "r=4"]  # finished settings were written as they finished

    evaluated.clear()
    interrupt = False
    main(_sweep_args(ckpt, labels, out, "r=2", "r=4", "r=6", "r=4"))
    # Only the unfinished setting ran (plus the unpatched model's outputs, its reference); the
    # repeated r=4 ran once.
    assert evaluated == ["none", "r=6"]
    rows = [json.loads(line) for line in open(out / "sweep.jsonl")]
    assert [r["setting"] for r in rows] == ["none", "r=2", "r=4", "r=6"]
    assert all("pareto" in r for r in rows)

    evaluated.clear()
    main(_sweep_args(ckpt, labels, out, "r=2", "--fresh"))
    assert evaluated == ["none", "r=2"]


def test_sweep_refuses_results_of_another_run(tiny, tmp_path, capsys):
    ckpt, labels = tiny
    out = tmp_path / "sweep"
    main(_sweep_args(ckpt, labels, out, "r=2"))
    with pytest.raises(SystemExit):
        main(_sweep_args(ckpt, labels, out, "r=2", "--limit", "5"))
    err = capsys.readouterr().err
    assert "belongs to another run" in err and "limit: null then, 5 now" in err


def test_eval_json_resumes_and_output_paths_are_checked_first(tiny, tmp_path, monkeypatch, capsys):
    ckpt, labels = tiny
    out_json = tmp_path / "new" / "folder" / "eval.jsonl"  # missing folders are created up front
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--quiet",
            "--jsonl", str(out_json), "--settings", "r=4"]
    main(args)
    assert [r["setting"] for r in read_rows(out_json)] == ["none", "r=4"]
    import tokenslim.evaluate as ev

    calls = []
    real = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: calls.append(k.get("label")) or real(*a, **k))
    main(args[:-1] + ["r=4", "r=8"])
    assert calls == ["r=8"]
    with pytest.raises(SystemExit):
        main(["sweep", "--checkpoint", str(ckpt), "--data", str(labels), "--out", str(out_json)])
    assert "is an existing file" in capsys.readouterr().err


def test_invalid_setting_for_the_model_fails_before_any_evaluation(tiny, monkeypatch, capsys):
    ckpt, labels = tiny
    import tokenslim.evaluate as ev

    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking settings"))
    for bad, message in (("r=-3", "r must be >= 0"), ("keep_rate=0.5,prune_layers=(9,)", "out of range"),
                         ("r=4,method=tofu", "unknown method")):
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--settings", bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and bad in err
        assert "Traceback" not in err


def test_cli_errors_have_no_traceback_unless_debug(tiny, capsys):
    ckpt, _ = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", str(ckpt), "--data", "nowhere/val"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no such data folder or file: nowhere/val" in err
    assert "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        main(["eval", "--checkpoint", str(ckpt), "--data", "nowhere/val", "--debug"])


def _png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_image_in_a_folder_is_named_not_replaced(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        (tmp_path / "data" / cls / "good.png").write_bytes(_png_bytes((10, 20, 30)))
    good = _png_bytes((1, 2, 3))
    (tmp_path / "data" / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    transform, _ = resolve_transform(make_model("vit"))
    data = open_dataset(str(tmp_path / "data"), transform)
    assert len(data) == 3 and data.classes == ["a", "b"]
    with pytest.raises(ValueError, match="truncated.png"):
        evaluate(make_model("vit", num_classes=2), data, num_workers=0, progress=False)  # two folders, two classes


def test_truncated_archive_and_tar_members_are_named(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        for name, data in (("test/a/0.png", _png_bytes((0, 0, 0))), ("test/b/1.png", b"not an image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (tmp_path / "d.tar").write_bytes(buf.getvalue())
    data = open_dataset(str(tmp_path / "d.tar"))
    assert data.targets == [0, 1]
    with pytest.raises(ValueError, match="test/b/1.png in .*d.tar"):
        data[1]
    packed = gzip.compress(buf.getvalue())
    (tmp_path / "cut.tar.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="cannot read the archive .*cut.tar.gz"):
        open_dataset(str(tmp_path / "cut.tar.gz"))


def test_labels_outside_the_head_fail_before_evaluating(tmp_path):
    (tmp_path / "x.png").write_bytes(_png_bytes((5, 5, 5)))
    (tmp_path / "labels.txt").write_text("x.png 3\nx.png 15\n")
    transform, _ = resolve_transform(make_model("vit"))
    data = open_dataset(str(tmp_path / "labels.txt"), transform)
    with pytest.raises(ValueError, match=r"outside the model's 10 classes, e.g. label 15 of item 1 \(.*x.png\)"):
        evaluate(make_model("vit"), data, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="reference model has 5 classes"):
        evaluate(make_model("vit"), data, reference=make_model("vit", num_classes=5), num_workers=0,
                 progress=False)


def test_settings_text_words_and_duplicates():
    assert parse_setting("criterion=l1,prop_attn=false,method=diffrate") == {
        "criterion": "l1", "prop_attn": False, "method": "diffrate"}
    with pytest.raises(ValueError, match="r is given twice"):
        parse_setting("r=8,r=2")
    with pytest.raises(ValueError, match="cannot read the value of r"):
        parse_setting("r=8%")


def test_sweep_dedupes_settings_and_says_so():
    names, duplicates = sweep_module.dedupe_settings(["r=4", "r=4", "none", "r=(4,0)", "r = 4"])
    assert names == ["none", "r=4", "r=(4,0)"] and duplicates == ["r=4", "none", "r = 4"]



def test_cached_reference_logits_give_the_same_result(tiny):
    import copy

    import tokenslim

    _, labels = tiny
    base = make_model("vit")
    transform, _ = resolve_transform(base)
    data = open_dataset(str(labels), transform)
    patched = tokenslim.patch(copy.deepcopy(base), r=12)
    direct = evaluate(patched, data, reference=base, num_workers=0, progress=False, batch_size=4)
    logits = evaluate(base, data, num_workers=0, progress=False, keep_logits=True).logits
    cached = evaluate(patched, data, reference_logits=logits, num_workers=0, progress=False, batch_size=4)
    for key in ("top1", "agreement", "kl", "top1_diff", "top1_diff_se", "reference_top1"):
        assert getattr(cached, key) == pytest.approx(getattr(direct, key), abs=1e-6), key
    assert "logits" not in cached.to_dict()


def test_ops_and_channel_descriptions_validate_shapes_and_indices():
    import copy

    import tokenslim
    from tokenslim.ops import source_matrix, unmerge

    with pytest.raises(ValueError, match="same batch size"):
        unmerge(torch.zeros(2, 5, 4), torch.zeros(3, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="refers to token 6, but num_tokens=4"):
        source_matrix(torch.tensor([[0, 6, 1]]), 4)
    model = make_model("vit")
    tokenslim.prune_channels(model, heads_pruned=0.34, mlp_pruned=0.5)
    tokenslim.materialize(model)
    desc = model.tokenslim_channels
    bad = copy.deepcopy(desc)
    bad["blocks"][0]["mlp"][1] = bad["blocks"][0]["mlp"][0]
    with pytest.raises(ValueError, match="repeats MLP channel indices"):
        tokenslim.restore_channels(make_model("vit"), bad)
    bad = copy.deepcopy(desc)
    bad["blocks"][1]["heads"][0] = 7
    with pytest.raises(ValueError, match="head index 7 is out of range for 3"):
        tokenslim.restore_channels(make_model("vit"), bad)


def test_truncated_checkpoint_is_called_corrupt(tiny, tmp_path):
    from tokenslim.loading import create_model

    ckpt, _ = tiny
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        create_model(checkpoint_path=str(cut))


@pytest.mark.parametrize("argv, message", [
    (["benchmark", "--threads", "0"], "--threads must be >= 1"),
    (["demo", "--epochs", "0"], "--epochs must be > 0"),
    (["macs", "--settings", "r=8,r=2"], "r is given twice"),
    (["eval", "--data", "x", "--device", "cuda:0"] if not torch.cuda.is_available() else
     ["eval", "--data", "x", "--device", "nonsense"], "--device"),
])
def test_bad_flags_fail_early_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err


def test_input_sizes_the_model_cannot_take_are_refused_before_work():
    import timm

    from tokenslim.measure import count_macs

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3)
    with pytest.raises(TypeError, match="img_size must be an int or \\(height, width\\) of ints, got '32'"):
        count_macs(model, img_size="32")
    with pytest.raises(ValueError, match="this model takes 32x32 px inputs .* got 33x33"):
        tokenslim.token_plan(model, img_size=33)
    assert tokenslim.token_plan(model, img_size=32).tokens[0] == 65
    dynamic = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=48,
                                num_heads=3, dynamic_img_size=True)
    assert tokenslim.token_plan(dynamic, img_size=48).tokens[0] == 145
    with pytest.raises(ValueError, match="not a multiple of the model's 4x4 px patches"):
        count_macs(dynamic, img_size=33)
