"""The evaluator: metrics by hand, real data readers, exact distributed runs, clear errors."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED, make_model, shared_data
from planted import NUM_CLASSES, PlantedDataset, PlantedModel
from tokenslim.evaluate import TarGzImageFolder, evaluate, open_dataset, parse_label_file, resolve_transform, subset
from tokenslim.ranks import shard_indices
from tokenslim.loading import create_model, load_checkpoint, save_checkpoint

IMAGENET = SHARED / "data" / "imagenet-val-1300"
CIFAR_TEST = SHARED / "data" / "cifar10-jpg" / "test.tar.gz"


def test_metrics_by_hand():
    n = 11
    model, ref, data = PlantedModel(n, seed=1), PlantedModel(n, seed=2), PlantedDataset(n)
    result = evaluate(model, data, reference=ref, batch_size=3, num_workers=0, device="cpu", progress=False)
    logits, ref_logits = model.table, ref.table
    target = torch.arange(n) % NUM_CLASSES
    c1 = [int(logits[i].argmax() == target[i]) for i in range(n)]
    r1 = [int(ref_logits[i].argmax() == target[i]) for i in range(n)]
    c5 = [int(target[i] in logits[i].topk(5).indices.tolist()) for i in range(n)]
    assert result.correct1 == sum(c1) and result.correct5 == sum(c5)
    assert result.top1 == pytest.approx(100 * sum(c1) / n)
    assert result.reference_top1 == pytest.approx(100 * sum(r1) / n)
    agree = sum(int(logits[i].argmax() == ref_logits[i].argmax()) for i in range(n))
    assert result.agreement == pytest.approx(100 * agree / n)
    assert result.loss == pytest.approx(F.cross_entropy(logits, target).item(), rel=1e-6)
    kl = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    assert result.kl == pytest.approx(kl.item(), rel=1e-6)
    d = [a - b for a, b in zip(c1, r1)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    assert result.top1_diff == pytest.approx(100 * mean) and result.top1_diff_se == pytest.approx(100 * se)
    json.dumps(result.to_dict())


def test_agreement_with_itself():
    model = make_model("vit")
    data = [(torch.randn(3, 32, 32), i % 10) for i in range(10)]
    result = evaluate(model, data, reference=model, batch_size=4, num_workers=0, device="cpu", progress=False)
    assert result.agreement == 100.0 and result.top1_diff == 0.0 and abs(result.kl) < 1e-9


def test_shards_are_disjoint_and_complete():
    for n in (0, 1, 7, 10, 23):
        for world in (1, 2, 3):
            for block in (1, 4):
                parts = [shard_indices(n, r, world, block) for r in range(world)]
                assert sorted(i for p in parts for i in p) == list(range(n))
                # Whole blocks: every shard is made of the blocks a single process would form.
                for r, p in enumerate(parts):
                    assert p == sorted(p) and all(i // block % world == r for i in p)


@pytest.mark.slow
@pytest.mark.parametrize("n", [23, 1])  # odd: the shards differ in size; 1: rank 1 has an empty shard
def test_torchrun_two_ranks_equals_single_process(tmp_path, n):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", str(Path(__file__).parent / "_dist_eval_worker.py"),
         str(out), str(n)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = json.loads(out.read_text())
    single = evaluate(PlantedModel(n, seed=1), PlantedDataset(n), reference=PlantedModel(n, seed=2),
                      batch_size=4, num_workers=0, device="cpu", progress=False)
    assert dist["world_size"] == 2 and dist["images"] == n
    for key in ("correct1", "correct5", "images", "top1", "top5", "agreement", "reference_top1", "top1_diff"):
        assert dist[key] == getattr(single, key), key
    se = single.top1_diff_se
    assert dist["top1_diff_se"] == se or (math.isnan(se) and math.isnan(dist["top1_diff_se"]))
    assert dist["loss"] == single.loss and dist["kl"] == single.kl  # order-free fixed-point sums: the same bits


def test_subset_is_deterministic():
    data = PlantedDataset(50)
    a, b = subset(data, 10, seed=3), subset(data, 10, seed=3)
    assert a.indices == b.indices == sorted(a.indices) and len(set(a.indices)) == 10
    assert subset(data, 10, seed=4).indices != a.indices
    assert subset(data, None) is data
    with pytest.raises(ValueError):
        subset(data, 0)


def test_holdout_is_exactly_what_the_subset_leaves_out():
    from torch.utils.data import TensorDataset

    from tokenslim.evaluate import holdout

    data = TensorDataset(torch.arange(50))
    picked = {int(data[i][0]) for i in subset(data, 12, seed=3).indices}
    rest = [int(x[0]) for x in holdout(data, 12, seed=3)]
    assert len(rest) == 38 and not picked & set(rest) and picked | set(rest) == set(range(50))
    assert rest == sorted(rest)
    with pytest.raises(ValueError, match="leaves nothing"):
        holdout(data, 50)


@shared_data
def test_label_file_comma_form_on_imagenet():
    samples = parse_label_file(str(IMAGENET / "dataset.txt"))
    assert len(samples) == 1300 and samples[0][1] == 472
    assert samples[0][0] == str((IMAGENET / "data" / "ILSVRC2012_val_00000347.JPEG").resolve())


@shared_data
def test_label_file_space_form_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    lines = []
    for name, label in [("ILSVRC2012_val_00000347.JPEG", 472), ("ILSVRC2012_val_00000355.JPEG", 260)]:
        shutil.copy(IMAGENET / "data" / name, tmp_path / "imgs" / name)
        lines.append(f"imgs/{name} {label}")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    model = make_model("vit")
    transform, config = resolve_transform(model)
    data = open_dataset(str(tmp_path / "labels.txt"), transform)
    img, label = data[1]
    assert img.shape == (3, 32, 32) and label == 260


@shared_data
def test_label_file_naming_missing_files():
    # val.txt lists all 50,000 validation files; only 1,300 exist (under data/).
    with pytest.raises(FileNotFoundError, match="do not exist"):
        parse_label_file(str(IMAGENET / "val.txt"))


@shared_data
def test_tar_gz_reader_on_cifar():
    data = TarGzImageFolder(str(CIFAR_TEST))
    assert len(data) == 10_000
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    img, label = data[0]
    assert img.size == (32, 32)
    counts = torch.bincount(torch.tensor(data.targets))
    assert counts.tolist() == [1000] * 10


@shared_data
def test_end_to_end_eval_on_cifar_subset():
    model = make_model("vit")  # 32 px, 10 classes
    transform, _ = resolve_transform(model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    data = subset(open_dataset(str(CIFAR_TEST), transform), 40, seed=0)
    result = evaluate(model, data, batch_size=16, num_workers=0, device="cpu", progress=False)
    assert result.images == 40 and 0 <= result.top1 <= 100 and result.top5 >= result.top1


def test_folder_dataset_and_errors(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "data" / cls / f"{i}.png")
    data = open_dataset(str(tmp_path / "data"))
    assert len(data) == 4 and sorted(t for _, t in (data[i] for i in range(4))) == [0, 0, 1, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        open_dataset(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such"):
        open_dataset(str(tmp_path / "missing"))
    (tmp_path / "bad.txt").write_text("a.png notalabel\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        open_dataset(str(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no images"):
        open_dataset(str(tmp_path / "empty.txt"))


def test_checkpoints(tmp_path, monkeypatch):
    import timm

    model = make_model("vit")
    path = tmp_path / "ckpt.pth"
    save_checkpoint(model, str(path), "vit_tiny_patch16_224",
                    {"img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 4, "num_heads": 3, "num_classes": 10},
                    data_config={"input_size": (3, 32, 32), "mean": (0.4914, 0.4822, 0.4465),
                                 "std": (0.247, 0.243, 0.261), "crop_pct": 1.0})
    loaded = create_model(checkpoint_path=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _, config = resolve_transform(loaded)
    assert config["mean"] == (0.4914, 0.4822, 0.4465) and config["input_size"] == (3, 32, 32)
    # A plain state dict of the wrong shape.
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="does not fit"):
        create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "plain.pth"))
    with pytest.raises(FileNotFoundError):
        create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "nope.pth"))
    # A tokenslim checkpoint whose arguments do not match its weights.
    bad = torch.load(path, weights_only=True)
    bad["model_kwargs"]["embed_dim"] = 96
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(str(tmp_path / "bad.pth"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="--checkpoint"):
        create_model("vit_tiny_patch16_224", pretrained=True)


def test_pretrained_without_network_answers_from_the_cache_at_once(monkeypatch):
    """An unreachable hub switches huggingface_hub to offline mode for the call (no minute of retries)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    import timm

    from tokenslim import loading

    seen = []

    def fake_create(*args, **kwargs):
        seen.append(constants.HF_HUB_OFFLINE)
        raise OSError("not in the local cache")

    monkeypatch.setattr(timm, "create_model", fake_create)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match="--checkpoint"):
        loading.create_model("vit_tiny_patch16_224", pretrained=True)
    assert seen == [True] and constants.HF_HUB_OFFLINE is False  # offline only during the call
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: True)
    with pytest.raises(RuntimeError):
        loading.create_model("vit_tiny_patch16_224", pretrained=True)
    assert seen == [True, False]
