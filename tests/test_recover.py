"""recover: short distillation with a few parameters, folded back (tiny models, a few steps)."""
import builtins
import copy

import pytest
import torch
from torch.utils.data import TensorDataset

import tokenslim
from conftest import SMALL, images, make_model, read_rows
from tokenslim.recover import lora_target_names, recover, trainable_parameters


def _data(n=32):
    return TensorDataset(images(n, seed=7), torch.arange(n) % 10)


def _teacher(**kw):
    """A small model with confident outputs, so a reduction visibly changes them."""
    model = make_model("vit", **kw)
    with torch.no_grad():
        model.head.weight.mul_(40)
    return model


def _kl(model, teacher, x):
    with torch.no_grad():
        t = teacher(x).log_softmax(-1)
        s = model(x).log_softmax(-1)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("method", ["bias", "norm", "bias_norm", "full"])
def test_distillation_lowers_the_gap_and_keeps_names_and_shapes(method):
    teacher = _teacher()
    model = tokenslim.patch(copy.deepcopy(teacher), r=10)
    x = _data()[:][0]
    shapes = {n: p.shape for n, p in model.state_dict().items()}
    frozen = {n: p.clone() for n, p in model.state_dict().items()}
    before = _kl(model, teacher, x)
    # Adam moves every trained weight by about lr per step: all of them at once need a smaller one.
    result = recover(model, teacher, _data(), method=method, steps=30, lr=1e-5 if method == "full" else 1e-4,
                     batch_size=16, save_every=5, progress=False)
    assert _kl(model, teacher, x) < before
    assert result.losses[-1] < result.losses[0]
    assert {n: p.shape for n, p in model.state_dict().items()} == shapes
    trained = set(trainable_parameters(model, method))
    for n, p in model.state_dict().items():
        if n not in trained:
            assert torch.equal(p, frozen[n]), f"{n} changed but is not trained by {method}"
    if method == "full":
        assert not torch.equal(model.blocks[0].attn.qkv.weight, frozen["blocks.0.attn.qkv.weight"])
    assert model.tokenslim.r == 10  # still the reduced model


def test_recovery_of_materialised_channels(tmp_path):
    teacher = _teacher()
    model = copy.deepcopy(teacher)
    tokenslim.prune_channels(model, mlp_pruned=0.5)
    tokenslim.materialize(model)
    before = _kl(model, teacher, _data()[:][0])
    recover(model, teacher, _data(), steps=25, lr=1e-4, batch_size=16, progress=False)
    assert _kl(model, teacher, _data()[:][0]) < before
    assert model.blocks[0].mlp.fc1.out_features == 96


@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_resume_continues_from_the_saved_step(tmp_path, mixup):
    teacher = make_model("vit")
    state = tmp_path / "rec.state"
    whole = tokenslim.patch(copy.deepcopy(teacher), r=8)
    recover(whole, teacher, _data(), steps=12, batch_size=16, save_every=4, mixup=mixup, progress=False)
    # Interrupt after step 8 (the log call of the loss raises), then resume with the same arguments.
    part = tokenslim.patch(copy.deepcopy(teacher), r=8)
    import tokenslim.recover.losses as rec  # the module whose kl_div the loss calls

    real_save_every = 4
    calls = {"n": 0}
    real_kl = rec.F.kl_div

    def failing_kl(*a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_kl(*a, **k)

    rec.F.kl_div = failing_kl
    try:
        with pytest.raises(KeyboardInterrupt):
            recover(part, teacher, _data(), steps=12, batch_size=16, save_every=real_save_every,
                    state_path=str(state), mixup=mixup, progress=False)
    finally:
        rec.F.kl_div = real_kl
    logs = []
    resumed = tokenslim.patch(copy.deepcopy(teacher), r=8)
    result = recover(resumed, teacher, _data(), steps=12, batch_size=16, save_every=4, state_path=str(state),
                     mixup=mixup, progress=False, log=logs.append)
    assert any("at step 8/12" in m for m in logs) and result.steps == 12
    # A resume with another objective would mix two runs: refused, naming what changed.
    other = tmp_path / "other.state"
    recover(tokenslim.patch(copy.deepcopy(teacher), r=8), teacher, _data(), steps=12, batch_size=16, save_every=4,
            state_path=str(other), mixup=mixup, progress=False)
    with pytest.raises(ValueError, match=r"another run \(temperature: 1.0 then, 2.0 now\)"):
        recover(tokenslim.patch(copy.deepcopy(teacher), r=8), teacher, _data(), steps=12, batch_size=16,
                save_every=4, state_path=str(other), mixup=mixup, temperature=2.0, progress=False)
    for (n, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_mixup_blends_neighbours_in_pairs_for_teacher_and_student():
    teacher = make_model("vit")
    model = tokenslim.patch(copy.deepcopy(teacher), r=4)
    seen = {"teacher": [], "student": []}
    teacher.register_forward_hook(lambda m, inp, out: seen["teacher"].append(inp[0].clone()))
    model.register_forward_hook(lambda m, inp, out: seen["student"].append(inp[0].clone()))
    data = _data(16)
    recover(model, teacher, data, steps=3, batch_size=16, mixup=0.4, seed=5, progress=False)
    order_g = torch.Generator().manual_seed(5)
    order = torch.randperm(16, generator=order_g).tolist()
    x = data[:][0][order]
    from tokenslim.recover import _beta

    lams = []
    for step in range(3):
        lam = _beta(0.4, torch.Generator().manual_seed(5 * 1_000_003 + step))
        lams.append(lam)
        if step == 0:  # the first epoch's batch is the whole (shuffled) data set
            pair = torch.arange(16) ^ 1  # 0-1, 2-3, ...: pairs never cross an even split over ranks
            torch.testing.assert_close(seen["teacher"][1 + step], lam * x + (1 - lam) * x[pair])
        torch.testing.assert_close(seen["teacher"][1 + step], seen["student"][1 + step])
    assert all(0.0 < lam < 1.0 for lam in lams) and len(set(lams)) == 3


def test_beta_draws_have_the_right_mean_and_spread():
    from tokenslim.recover import _beta

    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([_beta(0.5, g) for _ in range(4000)])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 1/8 for a = 1/2.
    assert abs(draws.mean().item() - 0.5) < 0.02
    assert abs(draws.var().item() - 0.125) < 0.01
    with pytest.raises(ValueError, match="mixup"):
        recover(make_model("vit"), make_model("vit"), _data(), mixup=-1.0)


def _class_token_gap(model, teacher, x):
    """Relative squared error of the class token entering the final norm (a plain recomputation)."""
    def final(m):
        seen = []
        h = m.norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0][:, 0]))
        with torch.no_grad():
            m(x)
        h.remove()
        return seen[0]

    t, s = final(teacher), final(model)
    return float(((s - t) ** 2).sum(-1).mean() / (t ** 2).sum(-1).mean())


def test_feature_matching_closes_the_class_token_gap_and_leaves_no_hooks():
    teacher = _teacher()
    x = _data()[:][0]
    plain = tokenslim.patch(copy.deepcopy(teacher), r=10)
    matched = tokenslim.patch(copy.deepcopy(teacher), r=10)
    recover(plain, teacher, _data(), method="bias_norm", steps=30, lr=1e-3, batch_size=16, progress=False)
    result = recover(matched, teacher, _data(), method="bias_norm", steps=30, lr=1e-3, batch_size=16,
                     feature_weight=5.0, save_every=5, progress=False)
    assert result.losses[-1] < result.losses[0]
    assert _class_token_gap(matched, teacher, x) < _class_token_gap(plain, teacher, x)
    for m in (matched, teacher):
        assert all(not mod._forward_hooks for mod in m.modules()), "hooks left behind"
    with pytest.raises(ValueError, match="class token"):
        recover(make_model("avg_no_class"), make_model("avg_no_class"), _data(), feature_weight=1.0)


def test_clear_errors():
    teacher = make_model("vit")
    model = tokenslim.patch(copy.deepcopy(teacher), r=4)
    with pytest.raises(ValueError, match="unknown recovery method 'ssf2'"):
        recover(model, teacher, _data(), method="ssf2")
    with pytest.raises(ValueError, match="same classes"):
        recover(model, make_model("vit", num_classes=7), _data(), steps=1, progress=False)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        recover(model, teacher, _data(), temperature=0.0)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_temperature_softens_both_outputs_and_scales_the_kl(temperature):
    teacher = _teacher()
    model = tokenslim.patch(copy.deepcopy(teacher), r=10)
    x = _data()[:][0]
    with torch.no_grad():  # the plain Hinton loss on the first batch (all 32 images), before any update
        t = (teacher(x) / temperature).log_softmax(-1)
        s = (model(x) / temperature).log_softmax(-1)
        expected = temperature ** 2 * float((t.exp() * (t - s)).sum(-1).mean())
    result = recover(model, teacher, _data(), method="bias", steps=1, lr=1e-4, batch_size=32, save_every=1,
                     temperature=temperature, progress=False)
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def test_lora_without_peft_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    teacher = make_model("vit")
    with pytest.raises(ImportError, match=r"pip install 'tokenslim\[peft\]'"):
        recover(tokenslim.patch(copy.deepcopy(teacher), r=4), teacher, _data(), method="lora")


def test_lora_targets_exclude_patch_embed():
    names = lora_target_names(make_model("vit"))
    assert "patch_embed.proj" not in names
    assert names[:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]


def test_lora_merges_back(tmp_path):
    pytest.importorskip("peft")
    teacher = _teacher()
    model = tokenslim.patch(copy.deepcopy(teacher), r=10)
    x = _data()[:][0]
    names = {n: p.shape for n, p in model.state_dict().items()}
    before = _kl(model, teacher, x)
    recover(model, teacher, _data(), method="lora", steps=30, lr=1e-4, batch_size=16, progress=False)
    assert {n: p.shape for n, p in model.state_dict().items()} == names
    assert _kl(model, teacher, x) < before
    assert type(model).__name__ == "TokenSlimVisionTransformer"


def test_recover_command_writes_a_checkpoint_that_eval_reproduces(tmp_path, capsys):
    import json

    from PIL import Image

    from tokenslim.cli import main
    from tokenslim.loading import load_checkpoint, save_checkpoint

    ckpt = tmp_path / "base.pth"
    save_checkpoint(make_model("vit"), str(ckpt), "vit_tiny_patch16_224", SMALL,
                    data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(12):
        Image.new("RGB", (32, 32), (i * 20, 90, 200 - i * 15)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"./img/{i}.png, {i % 10}")
    (tmp_path / "labels.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "recovered.pth"
    main(["recover", "--checkpoint", str(ckpt), "--settings", "r=6,mlp_pruned=0.25", "--data",
          str(tmp_path / "labels.txt"), "--steps", "4", "--batch-size", "4", "--out", str(out), "--quiet"])
    assert "recovered r=6,mlp_pruned=0.25 with bias_norm" in capsys.readouterr().out
    model = load_checkpoint(str(out))
    assert model.tokenslim.r == 6 and model.blocks[0].mlp.fc1.out_features == 144
    main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "labels.txt"), "--workers", "0", "--quiet",
          "--jsonl", str(tmp_path / "e.jsonl")])
    rows = read_rows(tmp_path / "e.jsonl")
    # The baseline is the recovered weights unreduced; the setting it carries is its own row.
    assert [r["setting"] for r in rows] == ["none", "r=6"]
    assert "r" not in rows[0]["settings"] and rows[1]["settings"]["r"] == 6


def test_light_augmentation_crops_and_flips_at_the_input_size():
    from PIL import Image

    from tokenslim.evaluate.data import light_augmentation

    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic"}
    transform = light_augmentation(config)
    img = Image.new("RGB", (48, 40))
    img.putdata([(x * 5 % 256, y * 6 % 256, (x * y) % 256) for y in range(40) for x in range(48)])
    torch.manual_seed(0)
    a, b = transform(img), transform(img)
    assert a.shape == b.shape == (3, 32, 32)
    assert not torch.equal(a, b)  # a different crop or flip each time


def test_lora_bias_norm_trains_adapters_and_biases_then_folds_back():
    pytest.importorskip("peft")
    teacher = _teacher()
    model = tokenslim.patch(copy.deepcopy(teacher), r=10)
    x = _data()[:][0]
    before_state = {n: p.clone() for n, p in model.state_dict().items()}
    before = _kl(model, teacher, x)
    result = recover(model, teacher, _data(), method="lora_bias_norm", steps=30, lr=1e-4, batch_size=16,
                     progress=False)
    after_state = model.state_dict()
    assert set(after_state) == set(before_state)  # nothing added: adapters merged, names unchanged
    assert _kl(model, teacher, x) < before
    # LoRA moved the adapted weights, bias/norm tuning the biases and norms; the rest is untouched.
    assert not torch.equal(after_state["blocks.0.attn.qkv.weight"], before_state["blocks.0.attn.qkv.weight"])
    assert not torch.equal(after_state["blocks.0.mlp.fc1.bias"], before_state["blocks.0.mlp.fc1.bias"])
    assert not torch.equal(after_state["blocks.0.norm1.weight"], before_state["blocks.0.norm1.weight"])
    assert torch.equal(after_state["patch_embed.proj.weight"], before_state["patch_embed.proj.weight"])
    bias_norm = sum(p.numel() for p in trainable_parameters(model, "bias_norm").values())
    assert result.trainable > bias_norm  # the adapters and the biases and norms trained together
    assert not any("lora" in n for n in after_state)
