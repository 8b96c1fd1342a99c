"""Resume only what is the same run, and never compare a model with itself.

The first group are results that used to come out silently wrong (each of these tests fails on the
code before run fingerprints); then the refusals that used to come late, raw or not at all.
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import tokenslim
import tokenslim.measure.table as table_module
from conftest import SMALL, images, make_model, read_rows
from tokenslim.cli import main
from tokenslim.fingerprint import check_same_run, data_digest, fingerprint, weights_digest
from tokenslim.journal import append_jsonl, read_jsonl
from tokenslim.loading import save_checkpoint

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}


def _save(path, seed=0, settings=None):
    save_checkpoint(make_model("vit", seed=seed), str(path), "vit_tiny_patch16_224", SMALL, data_config=DATA_CONFIG,
                    settings=settings)
    return path


def _labels(folder, n=9, shift=0, name="labels.txt"):
    (folder / f"img{shift}").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        Image.new("RGB", (32, 32), ((i * 25 + shift) % 256, 100, 200 - i * 20)).save(folder / f"img{shift}" / f"{i}.png")
        lines.append(f"./img{shift}/{i}.png, {i % 10}")
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


@pytest.fixture
def tiny(tmp_path):
    return _save(tmp_path / "tiny.pth"), _labels(tmp_path)


def _fails(capsys, argv, code=2):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------
# the fingerprint itself
# ---------------------------------------------------------------------------------------------

def test_weights_digest_follows_content_not_path(tmp_path):
    a, b = make_model("vit"), make_model("vit")
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.blocks[2].norm1.bias[0] += 1e-6  # one value of one norm: another model
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a.to(torch.bfloat16)) != weights_digest(make_model("vit"))  # dtypes count


def test_data_digest_sees_files_picks_and_transform(tmp_path):
    from tokenslim.evaluate import open_dataset, select

    labels = _labels(tmp_path)
    whole = open_dataset(str(labels))
    assert data_digest(whole) == data_digest(open_dataset(str(labels)))
    assert data_digest(select(whole, 5, None, 0)) != data_digest(select(whole, 5, None, 1))
    assert data_digest(select(whole, 5, None, 0))["picked"] != data_digest(select(whole, None, 5, 0))["picked"]
    other = _labels(tmp_path, shift=7, name="other.txt")  # same names and labels, other images
    Image.new("RGB", (40, 40)).save(tmp_path / "img7" / "0.png")  # one file of another size
    assert data_digest(open_dataset(str(other)))["items"] != data_digest(whole)["items"]
    from torchvision import transforms

    flipped = open_dataset(str(labels), transforms.RandomHorizontalFlip())
    assert data_digest(flipped)["transform"] != data_digest(open_dataset(str(labels), transforms.ToTensor()))["transform"]


def test_check_same_run_names_every_difference_and_refuses_unknown_runs():
    saved = fingerprint(None, None, lr=1e-3, settings="r=8")
    check_same_run(saved, fingerprint(None, None, lr=1e-3, settings="r=8"), "S")
    with pytest.raises(ValueError, match=r"S belongs to another run \(lr: 0.001 then, 0.002 now; settings: r=8 then, "
                                         r"r=16 now\)"):
        check_same_run(saved, fingerprint(None, None, lr=2e-3, settings="r=16"), "S")
    with pytest.raises(ValueError, match="without a run fingerprint"):
        check_same_run(None, saved, "S")
    with pytest.raises(ValueError, match="may not be named"):
        fingerprint(None, None, weights="mine")


def test_torn_journal_line_is_cut_so_the_next_row_survives(tmp_path):
    path = str(tmp_path / "j.jsonl")
    append_jsonl(path, {"setting": "a"})
    with open(path, "a") as f:
        f.write('{"setting": "b", "to')  # killed while writing
    assert [r["setting"] for _, r in read_jsonl(path)] == ["a"]
    append_jsonl(path, {"setting": "c"})
    assert [r["setting"] for _, r in read_jsonl(path)] == ["a", "c"]


# ---------------------------------------------------------------------------------------------
# 1-4: resumes that mixed two runs
# ---------------------------------------------------------------------------------------------

def _sweep(ckpt, labels, out, *settings):
    return ["sweep", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--quiet", "--out", str(out),
            "--bench-batch-size", "2", "--rounds", "15", "--device", "cpu", "--settings", *settings]


def test_sweep_refuses_rows_of_a_replaced_checkpoint(tiny, tmp_path, capsys):
    ckpt, labels = tiny
    main(_sweep(ckpt, labels, tmp_path / "s", "r=2"))
    _save(ckpt, seed=1)  # another model of the same architecture, at the same path
    err = _fails(capsys, _sweep(ckpt, labels, tmp_path / "s", "r=2", "r=4"))
    assert "belongs to another run (weights:" in err and "--fresh" in err
    main(_sweep(ckpt, labels, tmp_path / "s", "r=2", "r=4", "--fresh"))  # and starts over when asked
    # The same weights under another file name are the same run.
    os.replace(ckpt, tmp_path / "moved.pth")
    main(_sweep(tmp_path / "moved.pth", labels, tmp_path / "s", "r=2", "r=4"))
    assert "resuming" not in capsys.readouterr().err  # --quiet: nothing said, nothing recomputed either


def test_eval_json_refuses_results_of_a_replaced_checkpoint(tiny, tmp_path, capsys):
    ckpt, labels = tiny
    args = ["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--quiet",
            "--jsonl", str(tmp_path / "e.jsonl"), "--settings", "r=4"]
    main(args)
    _save(ckpt, seed=1)
    err = _fails(capsys, args)
    assert "e.jsonl:1 belongs to another run (weights:" in err


def _recover(ckpt, labels, out, *extra, settings="r=4"):
    return ["recover", "--checkpoint", str(ckpt), "--settings", settings, "--data", str(labels), "--steps", "3",
            "--batch-size", "4", "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("change", ["settings", "checkpoint", "data", "augment"])
def test_recover_refuses_a_resume_of_another_run(tiny, tmp_path, capsys, change):
    ckpt, labels = tiny
    out = tmp_path / "rec.pth"
    main(_recover(ckpt, labels, out))
    assert os.path.isfile(str(out) + ".state")
    if change == "settings":
        argv, named = _recover(ckpt, labels, out, settings="r=6"), "settings: r=4 then, r=6 now"
    elif change == "checkpoint":
        argv, named = _recover(_save(tmp_path / "other.pth", seed=1), labels, out), "weights:"
    elif change == "data":
        argv, named = _recover(ckpt, _labels(tmp_path, shift=3, name="other.txt"), out), "data:"
    else:
        argv, named = _recover(ckpt, labels, out, "--augment"), "augment: false then, true now"
    err = _fails(capsys, argv)
    assert "the recovery state" in err and named in err and "delete the file" in err


def test_recover_cli_caches_the_teacher_with_hflip_and_refuses_it_with_augment(tiny, tmp_path, capsys):
    ckpt, labels = tiny
    out = tmp_path / "cached.pth"
    main(_recover(ckpt, labels, out, "--hflip", "--cache-teacher"))
    assert "outputs are cached" in capsys.readouterr().err
    assert torch.load(out, weights_only=False)["extra"]["hflip"] is True
    err = _fails(capsys, _recover(ckpt, labels, tmp_path / "x.pth", "--augment", "--cache-teacher"))
    assert "--cache-teacher" in err and "use --hflip" in err


# ---------------------------------------------------------------------------------------------
# 5-6: a checkpoint that carries settings, and the model a result is labelled with
# ---------------------------------------------------------------------------------------------

def test_a_checkpoint_without_settings_is_measured_against_another_baseline(tmp_path, capsys):
    """A recovered or channel-materialised checkpoint carries no token settings: against --baseline
    its own weights must still be a row (they once were never evaluated at all)."""
    ckpt, original = _save(tmp_path / "recovered.pth", seed=1), _save(tmp_path / "original.pth", seed=0)
    labels = _labels(tmp_path)
    main(["eval", "--checkpoint", str(ckpt), "--baseline", str(original), "--data", str(labels), "--workers", "0",
          "--quiet", "--jsonl", str(tmp_path / "e.jsonl"), "--settings", "r=2"])
    rows = {r["setting"]: r for r in read_rows(tmp_path / "e.jsonl")}
    assert list(rows) == ["none", "checkpoint", "r=2"]
    assert rows["checkpoint"]["agreement"] < 100.0 and rows["checkpoint"]["kl"] > 1e-4  # other weights
    assert "r" not in rows["checkpoint"]["settings"]
    # With the checkpoint's own weights as the baseline, no extra row: "none" is the checkpoint.
    main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--quiet", "--jsonl",
          str(tmp_path / "f.jsonl")])
    assert [r["setting"] for r in read_rows(tmp_path / "f.jsonl")] == ["none"]


def test_checkpoint_that_carries_settings_is_compared_unreduced(tmp_path, capsys):
    ckpt = _save(tmp_path / "recovered.pth", settings="r=4")
    labels = _labels(tmp_path)
    main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--quiet",
          "--jsonl", str(tmp_path / "e.jsonl"), "--settings", "r=2"])
    err = capsys.readouterr().err
    assert "carries the settings r=4" in err
    rows = {r["setting"]: r for r in read_rows(tmp_path / "e.jsonl")}
    assert list(rows) == ["none", "r=4", "r=2"]
    assert "r" not in rows["none"]["settings"]  # the baseline is not reduced
    assert rows["r=4"]["settings"]["r"] == 4
    # The unreduced baseline is the saved weights themselves.
    plain = make_model("vit")
    x = images(2)
    base, carried = tokenslim.loading.load_baseline(checkpoint_path=str(ckpt))
    assert carried == "r=4" and not tokenslim.is_patched(base)
    assert torch.equal(base(x), plain(x))

    main(_sweep(ckpt, labels, tmp_path / "s", "r=2"))
    rows = [json.loads(line) for line in open(tmp_path / "s" / "sweep.jsonl")]
    assert [r["setting"] for r in rows] == ["none", "r=4", "r=2"]
    assert rows[1]["mac_ratio"] > rows[2]["mac_ratio"] > 1.0  # "none" really is unreduced


def test_recover_from_a_checkpoint_with_settings_says_whom_it_distils_from(tmp_path, capsys, monkeypatch):
    import tokenslim.recover as recover_module

    ckpt = _save(tmp_path / "recovered.pth", settings="r=4")
    labels = _labels(tmp_path)
    seen = {}
    real = recover_module.recover

    def spy(model, teacher, data, **kw):
        seen["teacher_patched"] = tokenslim.is_patched(teacher)
        return real(model, teacher, data, **kw)

    monkeypatch.setattr(recover_module, "recover", spy)
    main(_recover(ckpt, labels, tmp_path / "again.pth", settings="r=6"))
    assert "warning: the teacher is" in capsys.readouterr().err and seen["teacher_patched"] is False
    original = _save(tmp_path / "original.pth", seed=0)
    main(_recover(ckpt, labels, tmp_path / "again2.pth", "--teacher", str(original), settings="r=6"))
    assert "warning" not in capsys.readouterr().err


def test_a_checkpoint_names_its_own_model(tiny, tmp_path, capsys):
    ckpt, labels = tiny
    err = _fails(capsys, ["eval", "--model", "vit_small_patch16_224", "--checkpoint", str(ckpt), "--data",
                          str(labels), "--jsonl", str(tmp_path / "e.jsonl")])
    assert "builds vit_tiny_patch16_224, not vit_small_patch16_224" in err
    main(["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "0", "--quiet",
          "--jsonl", str(tmp_path / "e.jsonl")])
    saved = read_rows(tmp_path / "e.jsonl")
    assert saved[0]["run"]["model"] == "vit_tiny_patch16_224" and saved[0]["model"] == "vit_tiny_patch16_224"


# ---------------------------------------------------------------------------------------------
# 7-8: a metric that fails, data without labels
# ---------------------------------------------------------------------------------------------

def test_macs_count_attention_pool_heads():
    from tokenslim.measure.macs import count_macs

    model = make_model("map_pool")
    base = count_macs(model).gmacs
    assert base > 0 and count_macs(tokenslim.patch(model, r=2)).gmacs < base


def test_sweep_row_keeps_its_metrics_when_gmacs_fail(tiny, tmp_path, monkeypatch, capsys):
    ckpt, labels = tiny

    def broken(model, img_size=None):
        raise AssertionError("Expected gradient function to be set")

    monkeypatch.setattr(table_module, "count_macs", broken)
    main(_sweep(ckpt, labels, tmp_path / "s", "r=2"))
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in open(tmp_path / "s" / "sweep.jsonl")]
    assert [r["setting"] for r in rows] == ["none", "r=2"]
    assert rows[1]["gmacs"] is None and rows[1]["throughput_ratio"] > 0 and rows[1]["top1"] is not None
    assert "GMACs not counted: AssertionError" in rows[1]["error"] and "GMACs not counted" in out


def test_tune_on_images_without_labels(tmp_path):
    from tokenslim.tune import tune

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return images(1, seed=i)[0], -1

    result = tune(make_model("vit"), Unlabelled(), speedup=1.1, budget_min=10, rounds=15, batch_size=4,
                  search=("merge",), methods=("tome",))
    assert result.best.top1 is None and result.setting.startswith("r=")


# ---------------------------------------------------------------------------------------------
# unclear cases: a clear early error or the right behaviour
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["atc", "atc_average"])
def test_atc_keeps_a_non_finite_image_to_its_own_row(method):
    x = images(3)
    x[1, :, 5, 5] = float("nan")
    model = tokenslim.patch(make_model("vit"), r=4, method=method)
    out = model(x)
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()
    assert torch.allclose(out[[0, 2]], model(x[[0, 2]]), atol=1e-5)


def test_patched_transformers_and_open_clip_models_pickle_into_a_fresh_process(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("open_clip")
    from test_hf_vit import hf_models
    from test_open_clip_vit import _clip

    for name, model in (("hf", hf_models()["ViTForImageClassification"]()), ("clip", _clip())):
        tokenslim.patch(model.eval(), r=2)
        torch.save(model, tmp_path / f"{name}.pt")
    code = ("import torch, tokenslim\n"
            f"for n in ('hf', 'clip'):\n"
            f"    m = torch.load(r'{tmp_path}/' + n + '.pt', weights_only=False)\n"
            "    assert tokenslim.is_patched(m), n\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_token_plan_and_trace_merges_refuse_other_frameworks_clearly():
    pytest.importorskip("transformers")
    from test_hf_vit import hf_models

    model = tokenslim.patch(hf_models()["ViTModel"]().eval(), r=2)
    for call in (lambda: tokenslim.token_plan(model), lambda: tokenslim.trace_merges(model, None)):
        with pytest.raises(TypeError, match="reads timm ViTs.*model.tokenslim.plan"):
            call()


def test_settings_refuse_bad_options_and_unknown_names():
    model = tokenslim.patch(make_model("vit"), r=2)
    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            tokenslim.patch(make_model("vit"), r=2, method="ppt", threshold=bad)
    with pytest.raises(AttributeError, match="no setting 'rr'.*keep_rate"):
        model.tokenslim.rr = 8
    model.tokenslim.r = 3  # the real names still work
    assert model.tokenslim.r == 3


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any accuracy pass or timing starts."""
    import importlib

    import tokenslim.evaluate as ev
    import tokenslim.sweep as sweep_module

    bench = importlib.import_module("tokenslim.measure.benchmark")  # the module, not the function of that name

    def stop(*a, **k):
        pytest.fail("work started before the refusal")

    for module, name in ((ev, "evaluate"), (sweep_module, "evaluate"), (bench, "compare"), (table_module, "compare")):
        monkeypatch.setattr(module, name, stop)


EARLY = [
    (["eval", "--checkpoint", "{dir}", "--data", "{labels}"], "is a folder; pass the checkpoint file"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "{labels}", "--holdout", "-1"], "--holdout must be >= 1"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "{labels}", "--img-size", "33"], "takes 32x32 px inputs"),
    (["eval", "--checkpoint", "{ckpt}", "--data", "{labels}", "--img-size", "0"], "--img-size must be >= 1"),
    (["sweep", "--checkpoint", "{ckpt}", "--data", "{labels}", "--out", "{dir}/s", "--rounds", "5",
      "--settings", "r=2"], "--rounds must be >= 15"),
    (["tune", "--checkpoint", "{ckpt}", "--data", "{labels}", "--out", "{dir}/t", "--rounds", "3"],
     "--rounds must be >= 15"),
    (["tune", "--checkpoint", "{ckpt}", "--data", "{labels}", "--out", "{dir}/t", "--methods", "tome",
      "--method-option", "ppt:threshold=0.7"], "--method-option for ppt, which --methods (tome) does not search"),
    (["demo", "--settings", "r=-1", "--out", "{dir}/d"], "r must be >= 0"),
    (["recover", "--checkpoint", "{ckpt}", "--data", "{labels}", "--settings", "r=2", "--out", "{dir}/r.pth",
      "--method", "lora", "--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["recover", "--checkpoint", "{ckpt}", "--data", "{labels}", "--settings", "r=2", "--out", "{dir}/r.pth",
      "--ce-weight", "-1"], "--ce-weight must be >= 0"),
    (["recover", "--checkpoint", "{ckpt}", "--data", "{labels}", "--settings", "r=2", "--out", "{dir}/r.pth",
      "--state", "{labels}/r.state"], "--state"),
    (["benchmark", "--checkpoint", "{ckpt}", "--jsonl", "{dir}", "--settings", "r=2"], "--jsonl"),
]


@pytest.mark.parametrize("argv,message", EARLY, ids=[" ".join(a[:1] + a[4:6] + a[-2:]) for a, _ in EARLY])
def test_refused_before_any_work(tiny, tmp_path, capsys, no_work, argv, message):
    ckpt, labels = tiny
    argv = [a.format(dir=tmp_path, ckpt=ckpt, labels=labels) for a in argv]
    assert message in _fails(capsys, argv)


def test_corrupt_image_under_workers_is_one_line(tiny, tmp_path, capsys):
    ckpt, labels = tiny
    (tmp_path / "img0" / "3.png").write_bytes(b"not a png")
    err = _fails(capsys, ["eval", "--checkpoint", str(ckpt), "--data", str(labels), "--workers", "1", "--quiet"])
    assert "3.png" in err and "Original Traceback" not in err and "worker process" not in err


def test_vis_says_the_file_it_writes(tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ckpt, labels = tiny
    main(["vis", "--checkpoint", str(ckpt), "--data", str(labels), "--settings", "r=4", "--images", "2",
          "--out", str(tmp_path / "pictures")])
    written = tmp_path / "pictures" / "vis.png"  # --out is a folder, as in every tool
    assert written.is_file() and f"wrote {written}" in capsys.readouterr().out


def test_tune_says_when_it_misses_and_exits_non_zero(tiny, tmp_path, capsys):
    ckpt, labels = tiny
    argv = ["tune", "--checkpoint", str(ckpt), "--data", str(labels), "--out", str(tmp_path / "t"), "--speedup", "50",
            "--budget-min", "10", "--rounds", "15", "--batch-size", "4", "--methods", "tome", "--search", "merge",
            "--quiet"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out = capsys.readouterr().out
    assert exit_info.value.code == 3 and "MISSED: the target was 50.0x" in out
    assert json.loads((tmp_path / "t" / "tune.json").read_text())["reached"] is False
    main(argv + ["--allow-miss"])  # accepted on request, from the journal
    assert "MISSED" in capsys.readouterr().out


def test_recover_with_augmentation_is_repeatable(tmp_path):
    from tokenslim.evaluate import open_dataset
    from tokenslim.evaluate.data import light_augmentation
    from tokenslim.recover import recover

    labels = _labels(tmp_path, n=8)
    data = open_dataset(str(labels), light_augmentation({**DATA_CONFIG, "interpolation": "bicubic"}))
    teacher = make_model("vit")
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs))  # the caller's random state must not matter
        model = tokenslim.patch(copy.deepcopy(teacher), r=4)
        recover(model, teacher, data, steps=3, batch_size=4, progress=False)
        runs.append(model.state_dict())
    assert all(torch.equal(a, runs[1][k]) for k, a in runs[0].items())
