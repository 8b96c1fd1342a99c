"""The reliability probe's bad cases (issue 41): each of these failed before the fix.

No input is ever damaged (a file that is not our journal, the weights a run reads), data are read
with the model's labels or refused, exported files are checked for what they are, and unpatch
never silently returns something other than the original model."""
import copy
import io
import os
import tarfile

import pytest
import torch
from PIL import Image

import tokenslim
from conftest import SMALL, images, make_model
from tokenslim.cli import main
from tokenslim.journal import append_jsonl, read_jsonl
from tokenslim.loading import save_checkpoint
from test_same_run import _fails

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _save(path, seed=0, **config):
    save_checkpoint(make_model("vit", seed=seed), str(path), "vit_tiny_patch16_224", SMALL,
                    data_config={**DATA_CONFIG, **config})
    return path


def _image(path, i):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (i * 40 % 256, 90, 200 - i * 20)).save(path)


def _class_folders(root, classes, per_class=2):
    for c in classes:
        for i in range(per_class):
            _image(root / c / f"{i}.png", i)
    return root


# ---------------------------------------------------------------------------------------------
# 1. a file that is not our journal is refused untouched
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"my notes\nsecond line without newline", b"\x00\x01PK\x03\x04 binary\xff\xfe"])
def test_a_file_that_is_not_a_journal_is_refused_untouched(tmp_path, capsys, content):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    with pytest.raises(ValueError, match="not a tokenslim results file.*left untouched"):
        read_jsonl(str(notes))
    assert notes.read_bytes() == content
    ckpt = _save(tmp_path / "m.pth")
    data = _class_folders(tmp_path / "data", CIFAR, 1)
    err = _fails(capsys, ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--settings", "r=2", "--quiet",
                          "--jsonl", str(notes)])
    assert "notes.txt exists and is not a tokenslim results file" in err
    assert notes.read_bytes() == content
    err = _fails(capsys, ["eval", "--checkpoint", str(ckpt), "--data", str(data), "--settings", "r=2", "--quiet",
                          "--jsonl", str(notes), "--fresh"])  # --fresh deletes only a journal of ours
    assert notes.read_bytes() == content


def test_our_journal_with_a_torn_tail_is_still_repaired(tmp_path):
    path = tmp_path / "j.jsonl"
    append_jsonl(str(path), {"setting": "r=2", "run": {"x": 1}})
    with open(path, "a") as f:
        f.write('{"setting": "r=4", "ru')
    assert [row["setting"] for _, row in read_jsonl(str(path))] == ["r=2"]
    assert path.read_text().endswith("}\n")
    first_write_torn = tmp_path / "k.jsonl"
    first_write_torn.write_text('{"setting": "r=4", "ru')
    assert read_jsonl(str(first_write_torn)) == [] and first_write_torn.read_text() == ""


# ---------------------------------------------------------------------------------------------
# 2. recover never overwrites its input, nor a file it did not write
# ---------------------------------------------------------------------------------------------

def test_recover_refuses_to_overwrite_its_input_or_a_foreign_file(tmp_path, capsys):
    ckpt = _save(tmp_path / "ref.pth")
    before = ckpt.read_bytes()
    data = _class_folders(tmp_path / "data", CIFAR, 1)
    common = ["recover", "--checkpoint", str(ckpt), "--data", str(data), "--settings", "r=2", "--steps", "1",
              "--train-batch-size", "4", "--quiet"]
    err = _fails(capsys, common + ["--out", str(ckpt)])
    assert "is the --checkpoint of this run" in err and ckpt.read_bytes() == before
    other = tmp_path / "unrelated.pth"
    torch.save({"weights": torch.ones(3)}, other)
    other_bytes = other.read_bytes()
    err = _fails(capsys, common + ["--out", str(other)])
    assert "not a checkpoint tokenslim recover wrote; pass --force" in err and other.read_bytes() == other_bytes
    out = tmp_path / "rec.pth"
    main(common + ["--out", str(out)])  # a new file: written
    assert out.is_file()
    main(common + ["--out", str(out)])  # its own earlier output: a rerun may replace it
    main(common + ["--out", str(other), "--force"])
    assert other.read_bytes() != other_bytes
    err = _fails(capsys, common + ["--out", str(ckpt), "--force"])  # never an input, even forced
    assert ckpt.read_bytes() == before


def test_recover_negative_lr_names_the_flag(capsys):
    err = _fails(capsys, ["recover", "--model", "vit_tiny_patch16_224", "--data", "x", "--settings", "r=2",
                          "--lr", "-1"])
    assert "--lr must be a positive learning rate, got -1" in err


# ---------------------------------------------------------------------------------------------
# 3./4. class folders are the model's classes, or refused; archives read as folders
# ---------------------------------------------------------------------------------------------

def test_class_subset_is_matched_by_name_or_refused(tmp_path, capsys):
    from tokenslim.evaluate import match_classes, open_dataset

    data = _class_folders(tmp_path / "two", ["cat", "dog"])
    model = make_model("vit")  # 10 classes, no class names
    with pytest.raises(ValueError, match="2 class folders \\(cat, dog\\) for a model of 10 classes"):
        match_classes(open_dataset(str(data)), model)
    named = _save(tmp_path / "named.pth", label_names=CIFAR)
    plain = _save(tmp_path / "plain.pth")
    err = _fails(capsys, ["eval", "--checkpoint", str(plain), "--data", str(data), "--quiet"])
    assert "class folders (cat, dog)" in err
    loaded = tokenslim.loading.load_checkpoint(str(named))
    ds = open_dataset(str(data))
    match_classes(ds, loaded)
    assert sorted(set(ds.targets)) == [CIFAR.index("cat"), CIFAR.index("dog")]
    assert [ds[i][1] for i in range(len(ds))] == ds.targets
    match_classes(ds, loaded)  # repeatable
    assert sorted(set(ds.targets)) == [3, 5]
    bad = _class_folders(tmp_path / "bad", ["cat", "zebra"])
    with pytest.raises(ValueError, match="zebra are not among the model's class names"):
        match_classes(open_dataset(str(bad)), loaded)
    # recover with cross-entropy refuses before training
    err = _fails(capsys, ["recover", "--checkpoint", str(plain), "--data", str(data), "--settings", "r=2",
                          "--steps", "1", "--train-batch-size", "2", "--ce-weight", "1", "--quiet", "--out",
                          str(tmp_path / "r.pth")])
    assert "the training data: 2 class folders" in err and not (tmp_path / "r.pth").exists()
    # all ten folders, no names: sorted order, as before
    full = _class_folders(tmp_path / "full", CIFAR, 1)
    ds = open_dataset(str(full))
    match_classes(ds, model)
    assert ds.targets == list(range(10))


def _tar(path, names, gz=True):
    with tarfile.open(path, "w:gz" if gz else "w") as archive:
        for i, name in enumerate(names):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (i * 30 % 256, 60, 90)).save(buf, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            archive.addfile(info, io.BytesIO(buf.getvalue()))
    return path


@pytest.mark.parametrize("gz", [True, False])
def test_archive_without_class_folders_is_refused_like_a_folder(tmp_path, gz):
    from tokenslim.evaluate import open_dataset

    suffix = ".tar.gz" if gz else ".tar"
    flat = _tar(tmp_path / f"flat{suffix}", [f"imgs/{i}.png" for i in range(4)], gz)
    with pytest.raises(ValueError, match="holds no images in class folders"):
        open_dataset(str(flat))
    folder = tmp_path / "imgs"
    for i in range(4):
        _image(folder / f"{i}.png", i)
    with pytest.raises(ValueError, match="holds no images in class folders"):
        open_dataset(str(folder))
    # one top folder with class folders, or class folders at the root: the same classes
    nested = _tar(tmp_path / f"n{suffix}", ["test/cat/0.png", "test/dog/0.png", "test/dog/1.png"], gz)
    flat_classes = _tar(tmp_path / f"c{suffix}", ["cat/0.png", "dog/0.png", "dog/1.png", "loose.png"], gz)
    for path in (nested, flat_classes):
        ds = open_dataset(str(path))
        assert ds.classes == ["cat", "dog"] and ds.targets == [0, 1, 1]


def test_hidden_folders_are_not_classes(tmp_path):
    from tokenslim.evaluate import open_dataset

    root = _class_folders(tmp_path / "d", ["cat", "dog"])
    _image(root / ".ipynb_checkpoints" / "x.png", 1)
    assert open_dataset(str(root)).classes == ["cat", "dog"]
    arch = _tar(tmp_path / "a.tar.gz", ["cat/0.png", "dog/0.png", ".ipynb_checkpoints/0.png"])
    assert open_dataset(str(arch)).classes == ["cat", "dog"]


# ---------------------------------------------------------------------------------------------
# 5.-8. exported files
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("onnx")
    ckpt = root / "tiny.pth"
    save_checkpoint(make_model("vit", depth=2), str(ckpt), "vit_tiny_patch16_224", {**SMALL, "depth": 2},
                    data_config=DATA_CONFIG)
    other = root / "other.pth"
    save_checkpoint(make_model("vit", depth=2, embed_dim=24), str(other), "vit_tiny_patch16_224",
                    {**SMALL, "depth": 2, "embed_dim": 24}, data_config=DATA_CONFIG)
    for name, path, extra in (("a", ckpt, []), ("b", other, []), ("static", ckpt, ["--static-batch"])):
        main(["export", "--checkpoint", str(path), "--settings", "r=2", "--out", str(root / name), "--quiet"] + extra)
    labels = root / "labels.txt"
    lines = []
    for i in range(5):
        _image(root / "img" / f"{i}.png", i)
        lines.append(f"./img/{i}.png, {i}")
    labels.write_text("\n".join(lines) + "\n")
    return root, labels


def test_onnx_files_that_are_not_onnx_are_named(exported, tmp_path, capsys):
    root, labels = exported
    truncated = tmp_path / "t.onnx"
    truncated.write_bytes((root / "a" / "model.onnx").read_bytes()[:2000])
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    pt2 = tmp_path / "m.pt2"
    pt2.write_bytes(b"PK not really")
    for path in (truncated, text, pt2):
        err = _fails(capsys, ["eval", "--onnx", str(path), "--data", str(labels), "--quiet"])
        assert str(path) in err and "is not" in err and "InvalidProtobuf" not in err


def test_onnx_baseline_of_another_model_is_refused(exported, tmp_path, capsys):
    import shutil

    root, labels = exported
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(root / "a" / "model.onnx", mixed / "model.onnx")
    shutil.copy(root / "b" / "baseline.onnx", mixed / "baseline.onnx")
    for cmd in (["eval", "--data", str(labels)], ["benchmark", "--batch-size", "2", "--no-latency"]):
        err = _fails(capsys, cmd + ["--onnx", str(mixed / "model.onnx"), "--quiet"])
        assert "is not the baseline exported with" in err


def test_static_batch_file_evaluates_at_any_batch_and_benchmark_says_which(exported, capsys):
    root, labels = exported
    main(["eval", "--onnx", str(root / "static" / "model.onnx"), "--data", str(labels), "--quiet",
          "--eval-batch-size", "8"])
    assert "r=2" in capsys.readouterr().out
    err = _fails(capsys, ["benchmark", "--onnx", str(root / "static" / "model.onnx"), "--batch-size", "8",
                          "--no-latency", "--quiet"])
    assert "fixed batch of 2; time it with --batch-size 2" in err


def test_export_with_example_batch_1_is_refused_and_leaves_nothing(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt = _save(tmp_path / "m.pth")
    err = _fails(capsys, ["export", "--checkpoint", str(ckpt), "--settings", "r=2", "--out", str(tmp_path / "x"),
                          "--example-batch", "1", "--quiet"])
    assert "--example-batch 2" in err
    assert not list((tmp_path / "x").glob("*.onnx*"))  # nothing written (a missing folder globs empty)


def test_a_failed_export_check_removes_the_file(tmp_path, monkeypatch):
    import tokenslim.export as export_module

    def broken(path):
        raise RuntimeError("INVALID_ARGUMENT: boom")

    monkeypatch.setattr(export_module, "load", broken)
    model = tokenslim.patch(make_model("vit", depth=2), r=2)
    with pytest.raises(ValueError, match="could not be checked.*nothing was kept"):
        export_module.export(model, images(2), str(tmp_path / "m.pt2"), format="torch_export")
    assert not (tmp_path / "m.pt2").exists()


def test_onnx_export_writes_one_file(exported):
    root, _ = exported
    assert sorted(p.name for p in (root / "a").iterdir()) == ["baseline.onnx", "model.onnx"]


# ---------------------------------------------------------------------------------------------
# 9. unpatch after channel pruning
# ---------------------------------------------------------------------------------------------

def test_unpatch_after_channel_pruning_refuses_or_keeps_channels_on_request():
    model = make_model("vit")
    x = images(2)
    tokenslim.patch(model, r=2, mlp_pruned=0.5)
    with pytest.raises(ValueError, match="cannot give back.*copy.deepcopy.*keep_channels=True"):
        tokenslim.unpatch(model)
    assert tokenslim.is_patched(model)
    tokenslim.unpatch(model, keep_channels=True)
    assert not tokenslim.is_patched(model) and model.blocks[0].mlp.fc1.out_features < 192
    tokenslim.unpatch(model)  # nothing left to refuse: the model is what it now is
    applied = tokenslim.apply(make_model("vit"), "r=2,mlp_pruned=0.25")
    with pytest.raises(ValueError, match="cannot give back"):
        tokenslim.unpatch(applied)
    plain = make_model("vit")
    ref = plain(x)
    tokenslim.unpatch(tokenslim.patch(plain, r=4))
    torch.testing.assert_close(plain(x), ref, rtol=0, atol=0)
    copy.deepcopy(plain)


# ---------------------------------------------------------------------------------------------
# unclear cases mended
# ---------------------------------------------------------------------------------------------

def test_macs_refuses_a_bad_setting_before_printing_rows(capsys):
    err = _fails(capsys, ["macs", "--model", "vit_tiny_patch16_224", "--settings", "r=4", "r=-3"])
    out = capsys.readouterr().out
    assert "GMACs" not in out and "r=-3" in err


def test_tune_budget_must_be_finite():
    from tokenslim.tune import tune

    with pytest.raises(ValueError, match="budget_min must be a finite number"):
        tune(make_model("vit"), [(images(1)[0], 0)], speedup=1.5, budget_min=float("nan"))


def test_eval_resume_refusal_names_the_jsonl_flag(tmp_path, capsys):
    ckpt = _save(tmp_path / "m.pth")
    other = _save(tmp_path / "o.pth", seed=5)
    data = _class_folders(tmp_path / "data", CIFAR, 1)
    journal = tmp_path / "e.jsonl"
    main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--settings", "r=2", "--quiet",
          "--jsonl", str(journal)])
    capsys.readouterr()
    err = _fails(capsys, ["eval", "--checkpoint", str(other), "--data", str(data), "--settings", "r=2", "--quiet",
                          "--jsonl", str(journal)])
    assert "--jsonl" in err and "--out" not in err
    assert os.path.getsize(journal) > 0
