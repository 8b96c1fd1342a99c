"""timm's rotary-position family (``Eva``: DINOv3, EVA-02, PE, RoPE-ViT): exactness, pruning, merging treatments."""
import math

import pytest
import timm
import torch

import tokenslim
from tokenslim.ops.positions import grid_positions, neighbour_scores, token_positions
from tokenslim.ops.rope import affine_angles, check_affine, reduced_rotary

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)

# Every feature of the family: rope cat / mixed / dinov3, registers, qkv bias or none (fused and
# separate projections), SwiGLU, LayerScale, post-norm, avg / token / map pooling, dynamic size.
VARIANTS = {
    "rope_vit": ("vit_small_patch16_rope_224", {}),  # AttentionRope, fused qkv with bias, LayerScale, token pool
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),  # learned per-head, per-depth frequencies
    "dinov3_token": ("vit_small_patch16_dinov3", {"global_pool": "token"}),  # registers, no qkv bias, dynamic size
    "dinov3_avg": ("vit_small_patch16_dinov3", {}),  # avg pooling over patch tokens
    "eva02": ("eva02_tiny_patch14_224", {"patch_size": 4}),  # EvaAttention q/v bias, SwiGLU, rope + abs pos
    "pe_map": ("vit_pe_core_small_patch16_384", {"attn_pool_num_heads": 4}),  # attention pooling head
    "reg_gap": ("vit_medium_patch16_rope_reg1_gap_256", {}),  # no class token, one register, avg pool
    "post_norm": ("vit_small_patch16_rope_224", {"use_post_norm": True, "attn_type": "eva"}),
    "separate_qkv": ("eva02_tiny_patch14_224", {"patch_size": 4, "qkv_fused": False, "scale_mlp": True}),
}


def make_eva(name: str, seed: int = 0, **extra) -> torch.nn.Module:
    arch, kwargs = VARIANTS[name]
    torch.manual_seed(seed)
    model = timm.create_model(arch, **{**SMALL, **kwargs, **extra}).eval()
    with torch.no_grad():
        # Random weights of a useful size (timm's init leaves LayerScale at 1e-5 and heads at zero).
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def images(n: int = 3, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_r0_equals_unpatched(name):
    model = make_eva(name)
    x = images()
    with torch.no_grad():
        ref = model(x)
        ref_feat = model.forward_features(x)
        ref_int = model.forward_intermediates(x, indices=2)
        tokenslim.patch(model, r=0)
        assert tokenslim.is_patched(model)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.forward_features(x), ref_feat, rtol=0, atol=1e-6)
        final, inter = model.forward_intermediates(x, indices=2)
        torch.testing.assert_close(final, ref_int[0], rtol=0, atol=1e-6)
        for a, b in zip(inter, ref_int[1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    tokenslim.unpatch(model)
    assert type(model).__name__ == "Eva"


def test_dynamic_size_and_token_counts():
    model = make_eva("dinov3_token")  # 4 registers + class token, dynamic_img_size
    tokenslim.patch(model, r=4)
    plan = tokenslim.token_plan(model)
    assert plan.tokens[0] == 64 + 5 and plan.tokens[-1] == 69 - 16
    x = images(2, size=40)
    with torch.no_grad():
        trace = tokenslim.trace_merges(model, x)
        assert trace.tokens.shape[1] == 100 + 5 - 16
        assert trace.sizes.sum(1).tolist() == [105.0, 105.0]
        feats = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert feats[0].shape == (2, 64, 10, 10)


# ----------------------------------------------------------------------------------------------
# Pruning: a plain reference that gathers the kept tokens and their rotary rows by hand.
# ----------------------------------------------------------------------------------------------

def _reference_pruned(model, x, keep_rate, layer):
    """EViT pruning in one block of a class-token RoPE model, written out with timm's own modules."""
    p = model.num_prefix_tokens
    tokens, table = model._pos_embed(model.patch_embed(x))
    tokens = model.norm_pre(tokens)
    for i, block in enumerate(model.blocks):
        if i != layer:
            tokens = block(tokens, rope=table)
            continue
        attn = block.attn
        h = block.norm1(tokens)
        out = attn(h, rope=table)
        # The class token's attention row, from the rotated keys, averaged over heads.
        q, k, _ = attn.qkv(h).reshape(h.shape[0], h.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        from timm.layers.pos_embed_sincos import apply_rot_embed_cat

        k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], table, half=attn.rotate_half)], dim=2)
        row = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0].mean(1)
        tokens = tokens + (block.gamma_1 * out if block.gamma_1 is not None else out)
        n = tokens.shape[1] - p
        keep = math.ceil(keep_rate * n)
        rows = []
        for b in range(tokens.shape[0]):
            kept = sorted((row[b, p:].topk(keep).indices + p).tolist())  # order is irrelevant to attention
            rows.append((tokens[b, list(range(p)) + kept], table[[j - p for j in kept]]))
        tokens = torch.stack([r[0] for r in rows])
        table = torch.stack([r[1] for r in rows]).unsqueeze(1)  # [B, 1, keep, 2D], as timm's patch dropout
        mlp = block.mlp(block.norm2(tokens))
        tokens = tokens + (block.gamma_2 * mlp if block.gamma_2 is not None else mlp)
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("name", ["rope_vit", "dinov3_token"])
def test_pruning_keeps_the_rotary_rows_of_kept_tokens(name):
    model = make_eva(name)
    x = images()
    with torch.no_grad():
        ref = _reference_pruned(model, x, 0.5, layer=1)
        tokenslim.patch(model, keep_rate=0.5, prune_layers=(1,))
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
        # Whatever the treatment, a token of one patch keeps its own row: pruning alone is exact.
        for rope in ("blend", "local", "ignore"):
            model.tokenslim.rope = rope
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Merging treatments: the reduced rotary table against references written per token.
# ----------------------------------------------------------------------------------------------

def _table(model):
    """The model's own rotary table for 32 px images (block 0's for RoPE-Mixed)."""
    _, table = model._pos_embed(model.patch_embed(images(1)))
    return table[0] if getattr(model, "rope_mixed", False) else table


def _members(source, b, slot, p):
    return [j - p for j in range(p, source.shape[1]) if int(source[b, j]) == slot]


@pytest.mark.parametrize("name", ["rope_vit", "dinov3_token", "rope_mixed", "eva02"])
def test_mean_rotation_is_the_row_at_the_mean_position(name):
    model = make_eva(name)
    table = _table(model)
    p, n0 = model.num_prefix_tokens, 64 + model.num_prefix_tokens
    # Hand-made merges whose mean falls on a patch: (0,0)+(0,2) -> (0,1); a 3x3 block -> its centre;
    # four corners of a square -> its centre; (5,5) alone stays exact.
    groups = [[(0, 0), (0, 2)], [(r, c) for r in range(2, 5) for c in range(2, 5)], [(5, 0), (5, 2), (7, 0), (7, 2)]]
    expected_at = [(0, 1), (3, 3), (6, 1)]
    source = torch.full((1, n0), -1, dtype=torch.long)
    source[0, :p] = torch.arange(p)
    slot = p
    for group in groups:
        for r, c in group:
            source[0, p + 8 * r + c] = slot
        slot += 1
    source[0, p + 8 * 5 + 5] = slot
    n = slot + 1
    angles = affine_angles(table, 8, 8)
    positions = token_positions(grid_positions(8, 8, p), source, n, 1)
    rows = reduced_rotary(table, source, n, p, "mean", angles, positions)
    rows = rows[0, 0] if table.dim() == 2 else rows[0]
    for g, (r, c) in enumerate(expected_at):
        torch.testing.assert_close(rows[..., g, :], table[..., 8 * r + c, :], rtol=0, atol=2e-5)
    torch.testing.assert_close(rows[..., 3, :], table[..., 8 * 5 + 5, :], rtol=0, atol=0)


@pytest.mark.parametrize("treatment", ["blend", "ignore", "mean", "local", "local_blend"])
def test_treatments_against_per_token_reference(treatment):
    model = make_eva("rope_vit")
    tokenslim.patch(model, r=6, rope=treatment)
    x = images()
    with torch.no_grad():
        trace = tokenslim.trace_merges(model, x)
    table = _table(model)
    p, n = model.num_prefix_tokens, trace.tokens.shape[1]
    angles = affine_angles(table, 8, 8)
    got = reduced_rotary(table, trace.source, n, p, treatment, angles,
                         token_positions(grid_positions(8, 8, p), trace.source, n, 3))[:, 0]
    rotation = {"local": "mean", "local_blend": "blend"}.get(treatment, treatment)
    for b in range(3):
        for slot in range(p, n):
            members = _members(trace.source, b, slot, p)
            if rotation == "blend":
                want = table[members].mean(0)
            elif rotation == "ignore" or len(members) == 1:
                want = table[min(members)]
            else:
                row = sum(m // 8 for m in members) / len(members)
                col = sum(m % 8 for m in members) / len(members)
                angle = angles[0] + row * angles[1] + col * angles[2]
                want = torch.cat([angle.sin(), angle.cos()])
            torch.testing.assert_close(got[b, slot - p], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("treatment", ["mean", "blend", "local", "local_blend", "ignore"])
@pytest.mark.parametrize("name", ["rope_vit", "rope_mixed", "dinov3_avg", "pe_map"])
def test_batched_merging_equals_one_image_at_a_time(name, treatment):
    model = make_eva(name)
    tokenslim.patch(model, r=5, rope=treatment)
    x = images(3)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)


def test_treatments_change_only_merged_tokens():
    model = make_eva("rope_vit")
    x = images(2)
    outs = {}
    with torch.no_grad():
        for rope in ("mean", "blend", "ignore"):
            tokenslim.patch(model, r=6, rope=rope)
            outs[rope] = model(x)
    # The same merges (same metric before rotation), different rotations: different outputs.
    assert not torch.allclose(outs["mean"], outs["blend"]) and not torch.allclose(outs["mean"], outs["ignore"])


@pytest.mark.parametrize("treatment", ["local", "local_blend"])
def test_local_merges_neighbours_only(treatment):
    model = make_eva("rope_vit")
    tokenslim.patch(model, r=[12, 0, 0, 0], rope=treatment)
    with torch.no_grad():
        trace = tokenslim.trace_merges(model, images(3))
    p = model.num_prefix_tokens

    def near(i, j):
        return max(abs(i // 8 - j // 8), abs(i % 8 - j % 8)) <= 1

    for b in range(3):
        for slot in range(p, trace.tokens.shape[1]):
            members = _members(trace.source, b, slot, p)
            # One step: every member merged into the destination, a neighbour of each of them.
            assert any(all(near(d, m) for m in members) for d in members), (b, members)
    # Without the restriction the same step merges distant patches.
    tokenslim.patch(model, r=[12, 0, 0, 0], rope="mean")
    with torch.no_grad():
        trace = tokenslim.trace_merges(model, images(3))
    far = 0
    for b in range(3):
        for slot in range(p, trace.tokens.shape[1]):
            members = _members(trace.source, b, slot, p)
            far += any(max(abs(i // 8 - j // 8), abs(i % 8 - j % 8)) > 1 for i in members for j in members)
    assert far > 0


def test_neighbour_scores_rank_neighbours_first():
    scores = torch.tensor([[[0.9, -0.5, 0.99]]])
    a = torch.tensor([[[0.0, 0.0, 1.0]]])
    b = torch.tensor([[[0.0, 3.0, 1.0], [1.0, 1.0, 1.0], [0.0, 5.0, 1.0]]])
    out = neighbour_scores(scores, a, b)
    assert out[0, 0].argmax().item() == 1  # the only neighbour, though least similar
    assert out[0, 0, 0] > out[0, 0, 2]  # among non-neighbours, the nearer first
    assert out[0, 0, 0] < -1


def test_affine_fit_refuses_a_table_that_is_not_affine():
    table = torch.randn(16, 8)
    with pytest.raises(ValueError, match="not an affine function"):
        check_affine(table, 4, 4)
    for name in ("rope_vit", "rope_mixed", "dinov3_token", "eva02"):
        model = make_eva(name)
        check_affine(_table(model), 8, 8, tolerance=1e-5)


def test_settings_text_and_refusals():
    model = make_eva("rope_vit")
    tokenslim.apply(model, "r=4,rope=blend")
    assert model.tokenslim.rope == "blend" and model.tokenslim.as_dict()["rope"] == "blend"
    with pytest.raises(ValueError, match="rope must be one of"):
        tokenslim.patch(model, r=4, rope="median")
    with pytest.raises(ValueError, match="use method='tome' or 'mlerp'"):
        tokenslim.patch(model, r=4, rope="local", method="pitome")
    with pytest.raises(ValueError, match="head pruning is not supported on timm Eva"):
        tokenslim.patch(make_eva("rope_vit"), r=4, heads_pruned=0.5)
    with pytest.raises(ValueError, match="norm over its hidden channels"):
        tokenslim.patch(make_eva("separate_qkv"), r=4, mlp_pruned=0.5)  # EVA-02's SwiGLU with scale_mlp
    with pytest.raises(ValueError, match="patch_drop_rate"):
        tokenslim.patch(make_eva("rope_vit", patch_drop_rate=0.25), r=4)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10)
    with pytest.raises(ValueError, match="no rotary position"):
        tokenslim.patch(vit, r=2, rope="mean")
    no_cls = make_eva("reg_gap")
    with pytest.raises(ValueError, match="class token"):
        tokenslim.patch(no_cls, keep_rate=0.5, prune_layers=(1,))


def test_macs_follow_the_reduction():
    from tokenslim.measure.macs import count_macs

    model = make_eva("dinov3_avg")
    full = count_macs(model).gmacs
    tokenslim.patch(model, r=0)
    assert count_macs(model).gmacs == full
    tokenslim.patch(model, r=12)  # 69, 57, 45, 33 tokens entering the four blocks
    assert count_macs(model).gmacs < 0.8 * full


@pytest.mark.parametrize("text", ["r=4", "r=4,rope=blend", "r=4,rope=local", "r=4,rope=ignore",
                                  "keep_rate=0.5,prune_layers=(1,)"])
def test_onnx_export_equals_eager(tmp_path, text):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tokenslim.export import export, load

    model = tokenslim.apply(make_eva("rope_vit"), text)
    result = export(model, images(2), str(tmp_path / "m.onnx"), check_batches=(1, 3))
    assert max(result.max_abs_diff.values()) <= 1e-4
    from tokenslim.export import read_metadata

    assert ("rope=" in read_metadata(str(tmp_path / "m.onnx"))["settings"]) == ("rope=" in text)
    x = images(3, seed=9)
    with torch.no_grad():
        want = model(x)
    assert want.abs().max() > 0.1  # outputs of a useful size: the comparison can fail
    torch.testing.assert_close(load(str(tmp_path / "m.onnx"))(x), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["bias_norm", "lora"])
def test_recovery_lowers_the_gap_on_a_rotary_model(method):
    import copy

    from torch.utils.data import TensorDataset

    from tokenslim.recover import recover

    if method == "lora":
        pytest.importorskip("peft")
    teacher = make_eva("rope_vit")
    model = tokenslim.patch(copy.deepcopy(teacher), r=8)
    x = images(32, seed=7)

    def kl():
        with torch.no_grad():
            t, s = teacher(x).log_softmax(-1), model(x).log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    shapes = {n: p.shape for n, p in model.state_dict().items()}
    bias = model.blocks[0].attn.qkv.bias.detach().clone()
    before = kl()
    recover(model, teacher, TensorDataset(x, torch.arange(32) % 10), method=method, steps=20, lr=1e-3,
            batch_size=16, progress=False)
    assert kl() < before
    assert {n: p.shape for n, p in model.state_dict().items()} == shapes
    if method == "bias_norm":
        # A rotated key bias changes logits per position, so unlike in a plain ViT it trains.
        dim = bias.shape[0] // 3
        assert not torch.equal(model.blocks[0].attn.qkv.bias[dim:2 * dim], bias[dim:2 * dim])


def test_replaced_block_is_refused_by_name():
    from timm.models.vision_transformer import Block

    model = make_eva("rope_vit")
    model.blocks[2] = Block(64, 4)
    with pytest.raises(TypeError, match="cannot patch block 2 of type Block"):
        tokenslim.patch(model, r=4)
    assert not tokenslim.is_patched(model)
    model = tokenslim.patch(make_eva("rope_vit"), r=4)
    model.blocks[2] = Block(64, 4)
    with pytest.raises(TypeError, match="block 2 is now a Block"):
        model(images(1))


@pytest.mark.parametrize("method", ["mlerp", "pitome", "diffrate", "ppt", "atc"])
def test_every_method_reduces_a_rotary_model(method):
    model = make_eva("rope_vit")
    tokenslim.patch(model, r=4, method=method, rope="blend")
    x = images(3)
    with torch.no_grad():
        assert tokenslim.trace_merges(model, x).tokens.shape[1] == 65 - 16
        torch.testing.assert_close(model(x), torch.cat([model(x[i:i + 1]) for i in range(3)]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["rope_vit", "dinov3_token", "pe_map"])
def test_mlp_channel_pruning_materialises_exactly_and_reloads(tmp_path, name):
    from tokenslim.adapters.timm_channels import materialize, prune_channels
    from tokenslim.loading import load_checkpoint, save_checkpoint

    model = make_eva(name)
    x = images()
    prune_channels(model, mlp_pruned=0.5)
    with torch.no_grad():
        masked = model(x)
        materialize(model)
        assert model.blocks[0].mlp.fc2.in_features < 256
        torch.testing.assert_close(model(x), masked, rtol=1e-4, atol=1e-4)
        tokenslim.patch(model, r=4)
        merged = model(x)
    arch, kwargs = VARIANTS[name]
    tokenslim.unpatch(model)
    save_checkpoint(model, str(tmp_path / "m.pth"), arch, {**SMALL, **kwargs}, {"input_size": (3, 32, 32)})
    loaded = tokenslim.patch(load_checkpoint(str(tmp_path / "m.pth")).eval(), r=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged, rtol=1e-4, atol=1e-4)
