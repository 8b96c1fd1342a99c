"""tokenslim probe (and scripts/fit_probe.py, its old name): a linear head fitted on a frozen backbone's
features, saved as a classifier."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import SMALL, make_model
from tokenslim.loading import load_checkpoint, save_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fit_probe.py"


def _script():
    spec = importlib.util.spec_from_file_location("fit_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}


@pytest.fixture
def backbone_and_images(tmp_path):
    small = dict(SMALL, num_classes=0)
    backbone = make_model("vit", num_classes=0)
    path = tmp_path / "backbone.pth"
    save_checkpoint(backbone, str(path), "vit_tiny_patch16_224", small, CONFIG)
    # Two classes that differ in colour: any sensible probe separates them.
    g = torch.Generator().manual_seed(0)
    for c, base in enumerate(((200, 40, 40), (40, 40, 200))):
        (tmp_path / "img" / f"class{c}").mkdir(parents=True)
        for i in range(12):
            noise = torch.randint(-30, 31, (3,), generator=g).tolist()
            colour = tuple(max(0, min(255, b + n)) for b, n in zip(base, noise))
            Image.new("RGB", (32, 32), colour).save(tmp_path / "img" / f"class{c}" / f"{i}.png")
    return backbone, path, tmp_path / "img"


def test_fit_linear_is_the_optimum_on_raw_features():
    """The standardised fit, folded back, is a minimiser of the stated objective on raw features."""
    from tokenslim.probe import fit_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 2.0
    y = (x[:, 0] + x[:, 1] / 10 > 2.5).long() + (x[:, 3] > 2).long()
    w, b = fit_linear(x, y, 3, weight_decay=1e-2)
    # At the optimum the gradient of CE(raw) + wd/2 |w * std|^2 vanishes (the penalty is on the
    # standardised weights, which are w * std).
    w_, b_ = w.clone().requires_grad_(), b.clone().requires_grad_()
    std = x.std(0)
    loss = F.cross_entropy(x @ w_.T + b_, y) + 0.5e-2 * (w_ * std).pow(2).sum()
    loss.backward()
    assert w_.grad.abs().max() < 1e-4 and b_.grad.abs().max() < 1e-4
    assert w.abs().max() > 0.1  # the data are informative: the optimum is not the zero start


def test_probe_checkpoint_is_the_backbone_plus_the_head(backbone_and_images, tmp_path, capsys):
    backbone, path, folder = backbone_and_images
    out = tmp_path / "probe.pth"
    _script().main(["--backbone", str(path), "--data", str(folder), "--limit", "24", "--val", "4",
                    "--batch-size", "8", "--out", str(out)])
    assert "train 100.00%" in capsys.readouterr().out
    model = load_checkpoint(str(out)).eval()
    assert model.num_classes == 2 and model.pretrained_cfg["num_classes"] == 2
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = backbone(x)
        expected = features @ model.head.weight.T + model.head.bias
        assert torch.allclose(model(x), expected, atol=1e-5)
    for k, v in backbone.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    probe = torch.load(out, weights_only=False)["extra"]["probe"]
    assert probe["images"] == 24 and set(probe["accuracy"]) == {"train", "val"}
    # every default penalty was tried on the held-back images and the best (stronger on ties) kept
    candidates = probe["candidates"]
    assert [c["weight_decay"] for c in candidates] == [1e-1, 1e-2, 1e-3, 1e-4]
    best = max(c["val"] for c in candidates)
    assert probe["weight_decay"] == next(c["weight_decay"] for c in candidates if c["val"] == best)


def test_probe_refuses_a_model_with_a_head_and_bad_flags(backbone_and_images, tmp_path, capsys):
    _, path, folder = backbone_and_images
    classifier = tmp_path / "classifier.pth"
    save_checkpoint(make_model("vit"), str(classifier), "vit_tiny_patch16_224", SMALL, CONFIG)
    script = _script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--backbone", str(classifier), "--data", str(folder), "--out", str(tmp_path / "p.pth")])
    assert exit_info.value.code == 2 and "already has a 10-class head" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--backbone", str(path), "--data", str(folder), "--limit", "10", "--val", "10",
                     "--out", str(tmp_path / "p.pth")])
    assert exit_info.value.code == 2 and "--val" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--backbone", str(path), "--data", str(folder), "--val", "0", "--out", str(tmp_path / "p.pth")])
    assert exit_info.value.code == 2 and "--weight-decay" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--backbone", str(path), "--data", str(folder), "--out", str(path)])
    assert exit_info.value.code == 2


def test_probe_command_equals_the_script(backbone_and_images, tmp_path):
    """``tokenslim probe`` and ``scripts/fit_probe.py`` write the same head."""
    from tokenslim.cli import main

    _, path, folder = backbone_and_images
    args = ["--backbone", str(path), "--data", str(folder), "--limit", "24", "--val", "4", "--batch-size", "8"]
    main(["probe", *args, "--out", str(tmp_path / "a")])
    _script().main([*args, "--out", str(tmp_path / "b.pth")])
    a, b = load_checkpoint(str(tmp_path / "a" / "probe.pth")), load_checkpoint(str(tmp_path / "b.pth"))
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
