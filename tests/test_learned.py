"""The learned merge policy (method="learned"): an untrained policy is ToMe exactly, the soft
relaxation tends to the hard matching, training moves the policy alone, and it travels in checkpoints."""
import copy

import pytest
import torch
from torch.utils.data import TensorDataset

import tokenslim
from conftest import SMALL, images, make_model
from test_eva import make_eva
from tokenslim.merge_policy import attach_policy, policy_of
from tokenslim.ops import merge_tokens
from tokenslim.ops.matching import bipartite_soft_matching
from tokenslim.ops.straight_through import hard_weights, soft_weights, straight_through_merge


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_soft_matching_tends_to_the_hard_one(prefix):
    metric = torch.randn(3, 17 + prefix, 8, generator=torch.Generator().manual_seed(prefix))
    plan = bipartite_soft_matching(metric, 5, prefix)
    hard = hard_weights(plan.dest)
    assert int(hard.sum()) == 3 * 5
    errors = [float((soft_weights(metric, 5, prefix, tau) - hard).abs().max()) for tau in (0.3, 0.03, 1e-4)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3


def test_straight_through_merge_is_the_hard_merge_with_a_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 6, generator=g)
    sizes = torch.rand(2, 13, 1, generator=g) + 0.5
    metric = torch.randn(2, 13, 4, generator=g, requires_grad=True)
    plan = bipartite_soft_matching(metric.detach(), 4, 1)
    merged, _ = merge_tokens(x, sizes, plan.dest, plan.num_out)
    out = straight_through_merge(x, sizes, metric, plan.dest, merged, 4, 1)
    torch.testing.assert_close(out, merged, rtol=1e-6, atol=1e-6)
    out.pow(2).sum().backward()
    assert metric.grad is not None and float(metric.grad.abs().sum()) > 0


CASES = {"vit": lambda: make_model("vit"), "deit_distilled": lambda: make_model("deit_distilled"),
         "rope_vit": lambda: make_eva("rope_vit")}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("setting", [dict(r=4), dict(r=(6, -1)), dict(r=3, keep_rate=0.7, prune_layers=(1,))])
def test_an_untrained_policy_is_tome_exactly(name, setting):
    if name == "rope_vit" and "keep_rate" in setting:
        setting = dict(setting, fuse_pruned=True)
    model = CASES[name]()
    x = images(2) if name != "rope_vit" else torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tokenslim.patch(copy.deepcopy(model), **setting)(x)
        learned = copy.deepcopy(model)
        attach_policy(learned)
        tokenslim.patch(learned, method="learned", **setting)
        assert torch.equal(learned(x), ref)
        assert torch.equal(tokenslim.trace_merges(learned, x).source,
                           tokenslim.trace_merges(tokenslim.patch(copy.deepcopy(model), **setting), x).source)
    tokenslim.unpatch(learned)
    assert policy_of(learned) is None
    assert learned.state_dict().keys() == model.state_dict().keys()


def test_learned_without_a_policy_is_refused_naming_what_to_run():
    with pytest.raises(ValueError, match="recover .*--trainable merge"):
        tokenslim.patch(make_model("vit"), r=4, method="learned")
    model = tokenslim.patch(make_model("vit"), r=4)
    model.tokenslim.method = "learned"
    with pytest.raises(ValueError, match="--trainable merge"):
        model(images(1))


def _train(model, steps=6):
    from tokenslim.recover import recover

    teacher = copy.deepcopy(model)
    tokenslim.patch(model, r=6)
    data = TensorDataset(images(32, seed=3), torch.arange(32) % 10)
    return recover(model, teacher, data, method="merge", steps=steps, batch_size=8, lr=5e-2, progress=False,
                   log=lambda msg: None)


def test_training_moves_the_policy_alone_and_the_checkpoint_carries_it(tmp_path):
    from tokenslim.loading import load_checkpoint, save_checkpoint

    model = make_model("vit")
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    result = _train(model)
    assert result.trainable == sum(p.numel() for p in policy_of(model).parameters())
    after = model.state_dict()
    for k, v in backbone.items():
        assert torch.equal(after[k], v), k  # the backbone bit-identical
    assert any(float(p.abs().sum()) > 0 for p in policy_of(model).parameters())
    assert model.tokenslim.method == "learned"
    x = images(4)
    with torch.no_grad():
        trained = model.eval()(x)
        tome = tokenslim.patch(make_model("vit"), r=6)(x)
    assert not torch.equal(trained, tome)
    path = tmp_path / "learned.pth"
    save_checkpoint(model, str(path), "vit_tiny_patch16_224", SMALL, settings="r=6,method=learned")
    loaded = load_checkpoint(str(path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained, rtol=0, atol=0)
    tokenslim.unpatch(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), make_model("vit")(x), rtol=0, atol=0)  # the original exactly
    exported = tmp_path / "learned.pt2"
    from tokenslim.export import export

    res = export(load_checkpoint(str(path)), images(2), str(exported), format="torch_export")
    assert max(res.max_abs_diff.values()) <= 1e-4


def test_bad_requests_are_refused_before_any_work(tmp_path, capsys):
    from test_same_run import _fails
    from tokenslim.recover import recover

    model = make_model("vit")
    data = TensorDataset(images(8), torch.arange(8) % 10)
    with pytest.raises(ValueError, match="merges none"):
        recover(tokenslim.patch(copy.deepcopy(model), keep_rate=0.7, prune_layers=(1,)), model, data, method="merge",
                steps=1, batch_size=4)
    with pytest.raises(ValueError, match="method='diffrate'"):
        recover(tokenslim.patch(copy.deepcopy(model), r=4, method="diffrate"), model, data, method="merge", steps=1,
                batch_size=4)
    with pytest.raises(ValueError, match="patch a timm ViT"):
        recover(copy.deepcopy(model), model, data, method="merge", steps=1, batch_size=4)
    from tokenslim.loading import save_checkpoint

    ckpt = tmp_path / "m.pth"
    save_checkpoint(model, str(ckpt), "vit_tiny_patch16_224", SMALL)
    err = _fails(capsys, ["recover", "--checkpoint", str(ckpt), "--data", str(tmp_path), "--settings",
                          "keep_rate=0.7", "--trainable", "merge", "--quiet"])
    assert "--trainable merge learns ToMe's matching" in err


def test_other_frameworks_refuse_learned_by_name():
    transformers = pytest.importorskip("transformers")
    model = transformers.ViTModel(transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                                         intermediate_size=96, image_size=32, patch_size=4))
    with pytest.raises(ValueError, match="timm ViT and Eva models; the transformers adapter"):
        tokenslim.patch(model, r=2, method="learned")


def test_a_learned_policy_exports_to_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tokenslim.export import export

    model = make_model("vit", depth=3)
    with torch.no_grad():
        for p in attach_policy(model).parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(3))
    tokenslim.patch(model, r=4, method="learned")
    result = export(model, images(2), str(tmp_path / "learned.onnx"))
    assert max(result.max_abs_diff.values()) <= 1e-4
