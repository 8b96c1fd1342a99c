"""Attention-score pruning (EViT) alone and combined with merging, against plain references."""
import math

import pytest
import torch

import tokenslim
from conftest import VARIANTS, images, make_model
from tokenslim.ops import prune_sizes, prune_tokens, select_tokens


def test_select_is_top_k_by_score():
    torch.manual_seed(0)
    scores = torch.rand(3, 20)
    plan = select_tokens(scores, keep=7, num_prefix_tokens=2, fuse=True)
    for b in range(3):
        ranked = sorted(range(2, 20), key=lambda j: -scores[b, j].item())
        assert plan.keep_idx[b].tolist() == [0, 1] + ranked[:7]
        assert plan.drop_idx[b].tolist() == sorted(ranked[7:])
        dest = plan.dest[b].tolist()
        assert [dest[j] for j in plan.keep_idx[b].tolist()] == list(range(9))
        assert all(dest[j] == 9 for j in ranked[7:])
    assert plan.num_out == 10
    no_fuse = select_tokens(scores, keep=7, num_prefix_tokens=2, fuse=False)
    assert no_fuse.num_out == 9 and (no_fuse.dest == -1).sum() == 3 * 11


def test_prune_tokens_fuses_with_raw_attention_and_keeps_mass():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 4)
    scores = torch.rand(2, 10)
    plan = select_tokens(scores, keep=4, num_prefix_tokens=1, fuse=True)
    out = prune_tokens(x, plan, scores)
    for b in range(2):
        drop = plan.drop_idx[b]
        torch.testing.assert_close(out[b, -1], (x[b, drop] * scores[b, drop, None]).sum(0))
        torch.testing.assert_close(out[b, :5], x[b, plan.keep_idx[b]])
    sizes = prune_sizes(torch.arange(1, 11).float().view(1, 10, 1).expand(2, -1, -1), plan)
    assert sizes.sum(1).tolist() == [[55.0], [55.0]]
    assert prune_sizes(None, select_tokens(scores, 4, 1, fuse=False)) is None
    with pytest.raises(ValueError, match="weights"):
        prune_tokens(x, plan)
    with pytest.raises(ValueError, match="keep"):
        select_tokens(scores, keep=10, num_prefix_tokens=1, fuse=False)


# ----------------------------------------------------------------------------------------------
# Plain reference: one image, explicit full attention map, assignment matrices.
# ----------------------------------------------------------------------------------------------

def ref_forward(model, img, r_schedule, keep_rates, fuse, prop_attn):
    from test_exact import ref_merge

    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    p = model.num_prefix_tokens
    size = torch.ones(x.shape[0])
    source = torch.eye(x.shape[0])
    for block, r, rate in zip(model.blocks, r_schedule, keep_rates):
        attn = block.attn
        h = block.norm1(x)
        n = h.shape[0]
        qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim)
        q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
        if prop_attn:
            logits = logits + size.log()
        w = logits.softmax(-1)
        y = attn.norm((w @ v).transpose(0, 1).reshape(n, attn.attn_dim))
        if attn.gate is not None:
            y = y * attn.gate(h).sigmoid()
        x = x + block.ls1(attn.proj(y))
        metric = k.mean(0)
        if rate < 1.0:
            cls = w[:, 0].mean(0)  # class row, averaged over heads
            keep = math.ceil(rate * (n - p))
            order = sorted(range(p, n), key=lambda j: -cls[j].item())
            kept, dropped = order[:keep], sorted(order[keep:])
            rows = list(range(p)) + kept
            feat = torch.zeros(len(rows) + int(fuse), n)  # feature weights
            assign = torch.zeros(len(rows) + int(fuse), n)  # patch ownership
            for i, tok in enumerate(rows):
                feat[i, tok] = assign[i, tok] = 1
            if fuse:
                for j in dropped:
                    feat[-1, j] = cls[j]
                    assign[-1, j] = 1
            x, metric, size, source = feat @ x, feat @ metric, assign @ size, assign @ source
        x, size, assign = ref_merge(x, size, metric, r, p)
        source = assign @ source
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    if hasattr(model, "head_dist"):
        return (model.head(x[0]) + model.head_dist(x[1])) / 2, size, source
    return model.head(model.fc_norm(x[0])), size, source


CLASS_VARIANTS = [v for v in sorted(VARIANTS) if v not in ("avg_no_class", "map_pool")]


@pytest.mark.parametrize("fuse", [False, True])
def test_pruned_model_equals_plain_evit(fuse):
    model = make_model("vit", depth=6)
    x = images(2)
    tokenslim.patch(model, keep_rate=0.7, prune_layers=(1, 3, 4), fuse_pruned=fuse)
    s = model.tokenslim
    assert not s.uses_prop_attn  # EViT has no proportional attention
    with torch.no_grad():
        got = model(x)
        for b in range(2):
            expected, size, _ = ref_forward(model, x[b], s.r_schedule, s.keep_rates, fuse, prop_attn=False)
            assert (got[b] - expected).abs().max().item() <= 2e-5
    plan = model.tokenslim_plan(65)
    # Without fusion: ceil(0.7 * 64) = 45, ceil(0.7 * 45) = 32, ceil(0.7 * 32) = 23, plus the class token.
    # With fusion the fused token counts as a candidate next time: 45 (+1), ceil(0.7 * 46) = 33 (+1),
    # ceil(0.7 * 34) = 24 (+1).
    expected_tokens = (65, 65, 47, 47, 35, 26, 26) if fuse else (65, 65, 46, 46, 33, 24, 24)
    assert plan.tokens == expected_tokens


@pytest.mark.parametrize("variant", CLASS_VARIANTS)
def test_combined_prune_and_merge_equals_reference(variant):
    model = make_model(variant)
    x = images(2)
    tokenslim.patch(model, r=5, keep_rate=[0.8, 0.6], prune_layers=(1, 2), fuse_pruned=True)
    s = model.tokenslim
    assert s.uses_prop_attn
    with torch.no_grad():
        got = model(x)
        trace = tokenslim.trace_merges(model, x)
        for b in range(2):
            expected, size, source = ref_forward(model, x[b], s.r_schedule, s.keep_rates, True, prop_attn=True)
            assert (got[b] - expected).abs().max().item() <= 2e-5, variant
            # Sizes and sources agree with the reference: fused tokens conserve patch counts.
            torch.testing.assert_close(trace.sizes[b], size)
            owner = source.argmax(0)
            assert torch.equal(trace.source[b], owner)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), got)
    n0 = model.num_prefix_tokens + 64
    assert trace.sizes.sum(1).tolist() == [float(n0)] * 2
    plan = model.tokenslim_plan(n0)
    assert trace.tokens.shape[1] == plan.tokens[-1]


def test_prefix_tokens_always_kept_and_counts():
    model = tokenslim.patch(make_model("dinov2_registers"), keep_rate=0.5, prune_layers=(0, 2))
    with torch.no_grad():
        inter = model.forward_intermediates(images(2), output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
        trace = tokenslim.trace_merges(model, images(2))
    plan = model.tokenslim_plan(69)
    assert [t.shape[1] + p.shape[1] for t, p in inter] == list(plan.tokens[1:])
    assert plan.tokens == (69, 37, 37, 21, 21)
    assert trace.source[:, :5].tolist() == [list(range(5))] * 2
    # 48 of 64 patches were dropped without fusion: they hold no token.
    assert ((trace.source == -1).sum(1) == 48).all()
    with torch.no_grad():
        grid = model.forward_intermediates(images(2), indices=[3], intermediates_only=True)[0]
    assert (grid.flatten(2).abs().sum(1) == 0).sum(1).tolist() == [48, 48]


def test_no_reduction_equals_unpatched():
    model = make_model("deit_distilled")
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        tokenslim.patch(model, keep_rate=1.0, prune_layers=(0, 1), fuse_pruned=True)
        assert torch.equal(model(x), expected)
        model.tokenslim.keep_rate = 0.5  # changeable after patching
        assert not torch.allclose(model(x), expected)


def test_training_gradients_through_kept_and_fused():
    model = tokenslim.patch(make_model("vit"), r=3, keep_rate=0.6, prune_layers=(1,), fuse_pruned=True).train()
    out = model(images(4))
    out.sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("blocks.") or name in ("cls_token", "pos_embed"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_compile_without_graph_breaks():
    model = tokenslim.patch(make_model("vit"), r=3, keep_rate=0.6, prune_layers=(1,), fuse_pruned=True)
    explanation = torch._dynamo.explain(model)(images(2))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_bad_pruning_settings():
    model = make_model("vit")
    for kwargs, exc in [
        (dict(keep_rate=0.0, prune_layers=(1,)), ValueError),
        (dict(keep_rate=1.5, prune_layers=(1,)), ValueError),
        (dict(keep_rate=-0.2, prune_layers=(1,)), ValueError),
        (dict(keep_rate="0.5", prune_layers=(1,)), TypeError),
        (dict(keep_rate=0.5, prune_layers=(7,)), ValueError),  # 4 blocks
        (dict(keep_rate=0.5, prune_layers=(1, 1)), ValueError),
        (dict(keep_rate=0.5, prune_layers=(1.0,)), TypeError),
        (dict(keep_rate=[0.5, 0.7], prune_layers=(1,)), ValueError),
        (dict(keep_rate=0.5), ValueError),  # EViT's default blocks 3, 6, 9 do not exist here
    ]:
        with pytest.raises(exc):
            tokenslim.patch(model, **kwargs)
        assert not tokenslim.is_patched(model)
    with pytest.raises(ValueError, match="class token"):
        tokenslim.patch(make_model("avg_no_class"), keep_rate=0.5, prune_layers=(1,))
    with pytest.raises(ValueError, match="fuse_pruned"):
        tokenslim.patch(make_model("vit", global_pool="avg"), keep_rate=0.5, prune_layers=(1,))
    fused = tokenslim.patch(make_model("vit", global_pool="avg"), keep_rate=0.5, prune_layers=(1,), fuse_pruned=True)
    with torch.no_grad():
        feats = fused.forward_features(images(2))
        torch.testing.assert_close(fused.forward_head(feats), fused(images(2)))
    patched = tokenslim.patch(make_model("vit"), r=2)
    with pytest.raises(ValueError):
        patched.tokenslim.keep_rate = 2.0
    with pytest.raises(ValueError, match="out of range"):
        patched.tokenslim.keep_rate = 0.5


def test_assignment_that_drops_tokens_on_a_patch_pooling_model_is_refused_and_undone():
    model = tokenslim.patch(make_model("vit", global_pool="avg"), r=2, keep_rate=0.7, prune_layers=(1,), fuse_pruned=True)
    with pytest.raises(ValueError, match="set fuse_pruned=True"):
        model.tokenslim.fuse_pruned = False
    assert model.tokenslim.fuse_pruned is True  # the refused change did not stick
    with pytest.raises(ValueError, match="set fuse_pruned=True"):
        model.tokenslim.method = "ppt"  # PPT's pruning branch drops tokens too
    assert model.tokenslim.method == "tome"
    model.tokenslim.keep_rate = None
    model.tokenslim.fuse_pruned = False  # nothing pruned: allowed
    with pytest.raises(ValueError, match="set fuse_pruned=True"):
        model.tokenslim.keep_rate = 0.5
    assert model.tokenslim.keep_rate is None
