"""Channel pruning: masks equal materialised layers, criteria, rounding, save/load, composition."""
import copy
import io

import pytest
import torch

import tokenslim
from conftest import images, make_model
from tokenslim.adapters.timm_channels import has_masks, importance, plan_channels
from tokenslim.measure import count_macs
from tokenslim.ops.masks import kept_channels, kept_heads, top_mask


def test_rounding():
    assert kept_heads(6, 1 / 3) == 4 and kept_heads(6, 0.99) == 1 and kept_heads(6, 0) == 6
    assert kept_heads(3, 0.5) == 1  # round(1.5) = 2 removed
    assert kept_channels(1536, 0.5) == 768 and kept_channels(1536, 0.3) == 1072
    assert kept_channels(1536, 0.3) % 8 == 0
    assert kept_channels(190, 0.0) == 190 and kept_channels(20, 0.95) == 8 and kept_channels(5, 0.9) == 5
    for bad, exc in [(1.0, ValueError), (-0.1, ValueError), ("0.5", TypeError), (True, TypeError)]:
        with pytest.raises(exc):
            kept_heads(6, bad)
    assert top_mask(torch.tensor([0.1, 0.5, 0.5, 0.2]), 2).tolist() == [False, True, True, False]


@pytest.mark.parametrize("variant", ["vit", "deit3_layerscale", "qk_norm", "dinov2_registers", "deit_distilled"])
@pytest.mark.parametrize("reduction", [{}, {"r": 6}, {"r": 4, "keep_rate": 0.7, "prune_layers": (1, 2), "fuse_pruned": True}])
def test_masked_equals_materialized(variant, reduction):
    model = make_model(variant)
    x = images(3)
    plan = tokenslim.prune_channels(model, heads_pruned=1 / 3, mlp_pruned=0.5)
    assert [len(b.heads) for b in plan.blocks] == [2] * 4  # 1 of 3 heads removed
    assert [len(b.mlp) for b in plan.blocks] == [96] * 4  # 192 -> 96 channels
    if reduction:
        tokenslim.patch(model, **reduction)
    with torch.no_grad():
        masked = model(x)
        tokenslim.materialize(model)
        assert not has_masks(model) and model.blocks[0].attn.num_heads == 2
        assert model.blocks[0].attn.qkv.out_features == 3 * 2 * 16 and model.blocks[0].mlp.fc1.out_features == 96
        sliced = model(x)
    assert (masked - sliced).abs().max().item() <= 1e-5


def test_gated_mlp_and_gated_attention_slice_both_halves():
    model = make_model("gated_attn_dim", mlp_layer=__import__("timm").layers.SwiGLUPacked,
                       act_layer=torch.nn.SiLU)
    x = images(2)
    # gated_attn_dim has scale_norm: heads cannot be masked exactly, MLP channels can.
    with pytest.raises(ValueError, match="scale_norm"):
        tokenslim.prune_channels(model, heads_pruned=0.5)
    assert not has_masks(model)
    tokenslim.prune_channels(model, mlp_pruned=0.5)
    with torch.no_grad():
        masked = model(x)
        tokenslim.materialize(model)
        sliced = model(x)
    assert model.blocks[0].mlp.fc1.out_features == 2 * model.blocks[0].mlp.fc2.in_features
    assert (masked - sliced).abs().max().item() <= 1e-5


def test_gate_projection_sliced_with_heads():
    from timm.layers.attention import Attention

    model = make_model("vit")
    for block in model.blocks:
        block.attn = Attention(48, num_heads=3, attn_head_dim=24, qkv_bias=True, gated=True)
    x = images(2)
    tokenslim.prune_channels(model, heads_pruned=0.34)
    with torch.no_grad():
        masked = model(x)
        tokenslim.materialize(model)
        sliced = model(x)
    assert model.blocks[0].attn.gate.out_features == 2 * 24 and model.blocks[0].attn.attn_dim == 48
    assert (masked - sliced).abs().max().item() <= 1e-5


def test_mlp_norm_refused():
    model = make_model("swiglu_scale_norms")  # scale_mlp_norm=True
    with pytest.raises(ValueError, match="scale_mlp_norm"):
        tokenslim.prune_channels(model, mlp_pruned=0.5)
    tokenslim.prune_channels(model, heads_pruned=0.34)  # heads are fine
    assert has_masks(model)


def test_ratio_zero_changes_nothing():
    model = make_model("vit")
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        plan = tokenslim.prune_channels(model, 0.0, 0.0)
        assert not plan.prunes and not has_masks(model)
        assert torch.equal(model(x), expected)


def test_per_block_ratios_and_errors():
    model = make_model("vit")
    plan = plan_channels(model, heads_pruned=[0, 0.34, 0, 0.67], mlp_pruned=[0.5, 0, 0, 0.25])
    assert [len(b.heads) for b in plan.blocks] == [3, 2, 3, 1]
    assert [len(b.mlp) for b in plan.blocks] == [96, 192, 192, 144]
    with pytest.raises(ValueError, match="4 blocks"):
        plan_channels(model, heads_pruned=[0.5, 0.5])
    with pytest.raises(ValueError):
        plan_channels(model, mlp_pruned=1.0)
    with pytest.raises(ValueError, match="calibration data"):
        plan_channels(model, mlp_pruned=0.5, criterion="activation")
    with pytest.raises(ValueError, match="criterion"):
        plan_channels(model, mlp_pruned=0.5, criterion="random")
    with pytest.raises(ValueError, match="labelled"):
        plan_channels(model, mlp_pruned=0.5, criterion="taylor", data=[images(2)])
    with pytest.raises(ValueError, match="no channel masks"):
        tokenslim.materialize(model)
    with pytest.raises(TypeError, match="cannot patch"):
        plan_channels(torch.nn.Linear(2, 2), mlp_pruned=0.5)


@pytest.mark.parametrize("criterion", ["l1", "l2", "activation", "taylor"])
def test_criteria_rank_planted_unimportant_last(criterion):
    model = make_model("vit")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.view(3, 3, 16, 48)[:, 1] *= 0.01  # head 1: q, k, v rows
            block.attn.proj.weight[:, 16:32] *= 0.01  # head 1: proj columns
            block.mlp.fc1.weight[7] *= 0.01
            block.mlp.fc1.bias[7] = 0.0
            block.mlp.fc2.weight[:, 7] *= 0.01
    data = [(images(4, seed=s), torch.randint(0, 10, (4,))) for s in range(2)]
    scores = importance(model, criterion, data=data, num_batches=2)
    for heads, channels in scores:
        assert heads.argmin().item() == 1
        assert channels.argmin().item() == 7


def test_save_and_load_materialized(tmp_path):
    model = make_model("dinov2_registers")
    tokenslim.prune_channels(model, heads_pruned=0.34, mlp_pruned=[0.5, 0.25, 0, 0.75])
    tokenslim.materialize(model)
    x = images(2)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "pruned.pth"
    torch.save({"channels": model.tokenslim_channels, "state_dict": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    fresh = tokenslim.restore_channels(make_model("dinov2_registers", seed=7), ckpt["channels"])
    fresh.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    # Through a tokenslim checkpoint too: the channel description travels with the weights.
    from tokenslim.loading import create_model, save_checkpoint
    from conftest import SMALL

    save_checkpoint(model, str(tmp_path / "ts.pth"), "vit_small_patch14_reg4_dinov2",
                    {**SMALL, "init_values": 0.5})
    loaded = create_model(checkpoint_path=str(tmp_path / "ts.pth"))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    with pytest.raises(ValueError, match="description"):
        tokenslim.restore_channels(model, ckpt["channels"])  # already sliced


def test_materialize_twice_keeps_absolute_indices():
    model = make_model("vit")
    tokenslim.prune_channels(model, heads_pruned=0.34, mlp_pruned=0.5)
    tokenslim.materialize(model)
    first = copy.deepcopy(model.tokenslim_channels)
    tokenslim.prune_channels(model, mlp_pruned=0.5)
    tokenslim.materialize(model)
    second = model.tokenslim_channels
    for a, b in zip(first["blocks"], second["blocks"]):
        assert set(b["mlp"]) <= set(a["mlp"]) and len(b["mlp"]) == 48 and b["hidden"] == 192
        assert b["heads"] == a["heads"] and b["num_heads"] == 3


def test_macs_and_params_drop_as_computed():
    model = make_model("vit")  # 4 blocks, 65 tokens, dim 48, 3 heads of 16, hidden 192
    before = count_macs(model)
    tokenslim.prune_channels(model, heads_pruned=0.34, mlp_pruned=0.5)
    assert count_macs(model).gmacs == before.gmacs  # masks alone save nothing
    tokenslim.materialize(model)
    after = count_macs(model)
    n, d = 65, 48
    per_block = (n * d * 3 * 16 + n * 16 * d + 2 * n * n * 16) + (2 * n * d * 96)  # one head, 96 channels
    assert (before.gmacs - after.gmacs) * 1e9 == pytest.approx(4 * per_block, abs=1)
    params = (d * 3 * 16 + 3 * 16 + 16 * d) + (d * 96 + 96 + 96 * d)
    assert (before.params_m - after.params_m) * 1e6 == pytest.approx(4 * params, abs=0.5)


def test_masks_survive_deepcopy_and_device_moves_and_keep_state_dict_keys():
    model = make_model("vit")
    keys = list(model.state_dict())
    tokenslim.prune_channels(model, heads_pruned=0.34, mlp_pruned=0.5)
    assert list(model.state_dict()) == keys
    twin = copy.deepcopy(model).to(torch.float64)
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(twin(x.double()).float(), model(x), atol=1e-5, rtol=1e-5)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(x), model(x))
    tokenslim.remove_masks(model)
    assert not has_masks(model)


def test_patch_first_then_prune_channels():
    model = tokenslim.patch(make_model("dinov2_registers"), r=5, keep_rate=0.7, prune_layers=(2,), fuse_pruned=True)
    x = images(2)
    tokenslim.prune_channels(model, heads_pruned=0.34, mlp_pruned=0.5, criterion="l1")
    with torch.no_grad():
        masked = model(x)
        tokenslim.materialize(model)
        sliced = model(x)
        # Unpatching keeps the smaller layers and gives the plain (unreduced) pruned model.
        tokenslim.unpatch(model)
        plain = model(x)
    assert (masked - sliced).abs().max().item() <= 1e-5
    assert tokenslim.is_patched(model) is False and plain.shape == (2, 10)
