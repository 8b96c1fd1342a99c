"""Patched models against the unpatched model (r=0) and against a plain ToMe reference (r>0)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tokenslim
from conftest import images, make_model


@pytest.mark.parametrize("fused", [True, False])
def test_r0_equals_unpatched(variant, fused):
    model = make_model(variant)
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = images(3)
    with torch.no_grad():
        expected = model(x)
        expected_feats = model.forward_features(x)
        tokenslim.patch(model, r=0)
        got = model(x)
        got_feats = model.forward_features(x)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"{variant}: r=0 differs from unpatched by {diff}"
    assert (got_feats - expected_feats).abs().max().item() <= 1e-5


def test_prop_attn_off_r0_and_masks_at_r0():
    model = make_model("vit")
    x = images(2)
    n = 1 + (32 // 4) ** 2
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = model(x, attn_mask=mask)
        expected_causal = model(x, is_causal=True)
        tokenslim.patch(model, r=0, prop_attn=False)
        assert torch.equal(model(x, attn_mask=mask), expected)
        assert torch.equal(model(x, is_causal=True), expected_causal)


# ----------------------------------------------------------------------------------------------
# A plain reference of ToMe on a timm ViT: explicit softmax, dense source matrix, per-image loops.
# ----------------------------------------------------------------------------------------------

def ref_merge(x, size, metric, r, prefix):
    """One ToMe step for one image: x [N, C], size [N], metric [N, D]."""
    n = x.shape[0]
    r = min(r, (n - prefix) // 2)
    if r <= 0:
        return x, size, torch.eye(n, dtype=x.dtype)
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_idx = list(range(0, n, 2))
    b_idx = list(range(1, n, 2))
    cand_b = [j for j in b_idx if j >= prefix]
    best = {}
    for i in a_idx:
        if i >= prefix:
            sims = torch.stack([m[i] @ m[j] for j in cand_b])
            best[i] = (sims.max().item(), cand_b[int(sims.argmax())])
    gone = sorted(best, key=lambda i: (-best[i][0], i))[:r]
    order = list(range(prefix)) + [i for i in a_idx if i >= prefix and i not in gone] + cand_b
    # Assignment matrix [N_out, N]: row k sums the tokens merged into output token k.
    assign = torch.zeros(len(order), n, dtype=x.dtype)
    for k, tok in enumerate(order):
        assign[k, tok] = 1
    for i in gone:
        assign[order.index(best[i][1]), i] = 1
    new_size = assign @ size
    return (assign @ (x * size[:, None])) / new_size[:, None], new_size, assign


def ref_block(block, x, size, r, prefix, prop_attn=True):
    """One timm Block with ToMe for one image, written out."""
    attn = block.attn
    h = block.norm1(x)
    n = h.shape[0]
    gate = attn.gate(h).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    if prop_attn:
        logits = logits + size.log()[None, None, :]
    y = (logits.softmax(-1) @ v).transpose(0, 1).reshape(n, attn.attn_dim)
    y = attn.norm(y)
    if gate is not None:
        y = y * gate
    x = x + block.ls1(attn.proj(y))
    x, size, assign = ref_merge(x, size, k.mean(0), r, prefix)
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, size, assign


def ref_forward(model, img, schedule, prop_attn=True):
    """Logits for one image [3, H, W]."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    prefix = model.num_prefix_tokens
    size = torch.ones(x.shape[0])
    source = torch.eye(x.shape[0])
    for block, r in zip(model.blocks, schedule):
        x, size, assign = ref_block(block, x, size, r, prefix, prop_attn)
        source = assign @ source
    x = model.norm(x)
    assert torch.equal(source.sum(1), size)
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        # Pools other than token/avg see each token once per patch it holds.
        full = (source.t() @ x)[None]
        pooled = model.pool(full)[0]
    elif model.global_pool == "token":
        pooled = x[0]
    else:
        pooled = (x[prefix:] * size[prefix:, None]).sum(0) / size[prefix:].sum()
    if hasattr(model, "head_dist"):
        return (model.head(model.fc_norm(x[0])) + model.head_dist(x[1])) / 2
    return model.head(model.fc_norm(pooled))


@pytest.mark.parametrize("r", [8, [12, 0, 6, 9], (6, -1)])
def test_patched_equals_plain_reference(variant, r):
    model = make_model(variant)
    x = images(2)
    tokenslim.patch(model, r=r)
    schedule = model.tokenslim.r_schedule
    with torch.no_grad():
        got = model(x)
        for b in range(x.shape[0]):
            expected = ref_forward(model, x[b], schedule)
            diff = (got[b] - expected).abs().max().item()
            assert diff <= 2e-5, f"{variant} r={r}: differs from reference by {diff}"


def test_prop_attn_off_equals_reference():
    model = make_model("deit_distilled")
    x = images(2)
    tokenslim.patch(model, r=10, prop_attn=False)
    with torch.no_grad():
        got = model(x)
        for b in range(2):
            expected = ref_forward(model, x[b], model.tokenslim.r_schedule, prop_attn=False)
            assert (got[b] - expected).abs().max().item() <= 2e-5


def test_distilled_prefix_order_kept():
    model = tokenslim.patch(make_model("deit_distilled"), r=12)
    trace = tokenslim.trace_merges(model, images(2))
    # Class and distillation tokens hold only themselves and stay at slots 0 and 1.
    assert trace.source[:, :2].tolist() == [[0, 1], [0, 1]]
    assert torch.equal(trace.sizes[:, :2], torch.ones(2, 2))


def test_sdpa_log_size_mask_equals_explicit_softmax():
    from tokenslim.adapters.timm_vit import attention_forward

    model = make_model("qk_norm")
    attn = model.blocks[0].attn
    x = torch.randn(2, 11, 48)
    sizes = torch.randint(1, 6, (2, 11, 1)).float()
    log_size = sizes.log().transpose(1, 2).unsqueeze(1)
    with torch.no_grad():
        fused, m1, cls1 = attention_forward(attn, x, log_size, return_metric=True, return_cls_attn=True)[:3]
        manual_attn = copy.deepcopy(attn)
        manual_attn.fused_attn = False
        manual, m2, cls2 = attention_forward(manual_attn, x, log_size, return_metric=True, return_cls_attn=True)[:3]
        # Fully explicit: softmax over logits + log(size).
        qkv = attn.qkv(x).reshape(2, 11, 3, 3, 16).permute(2, 0, 3, 1, 4)
        q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
        w = F.softmax(q @ k.transpose(-1, -2) * attn.scale + log_size, dim=-1)
        explicit = attn.proj((w @ v).transpose(1, 2).reshape(2, 11, 48))
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(manual, explicit, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(m1, k.mean(1))
    # The class-token row alone equals row 0 of the full map (with the size bias), head-averaged.
    torch.testing.assert_close(cls1, w[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls2, w[:, :, 0].mean(1), atol=1e-6, rtol=1e-5)
    # Proportional attention is what attention over repeated keys computes.
    rep = sizes[0, :, 0].long()
    xr = torch.repeat_interleave(x[:1], rep, dim=1)
    with torch.no_grad():
        yr = attention_forward(attn, xr).out
    first = torch.cumsum(rep, 0) - rep
    torch.testing.assert_close(yr[0, first], fused[0], atol=1e-5, rtol=1e-5)


def test_batch_independence():
    model = tokenslim.patch(make_model("dinov2_registers"), r=8)
    x = images(4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
