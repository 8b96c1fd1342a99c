"""Every reduction method against a plain reference written here: one image at a time, the full
attention map, explicit loops and dense assignment matrices."""
import math

import pytest
import torch
import torch.nn.functional as F

import tokenslim
from conftest import VARIANTS, images, make_model
from test_exact import ref_merge
from tokenslim.methods import get_method, method_names
from tokenslim.methods.atc import cluster
from tokenslim.ops import merge_tokens

CLASS_VARIANTS = [v for v in sorted(VARIANTS) if v not in ("avg_no_class", "map_pool")]


def assignment(order, groups, n):
    """[len(order), n] 0/1 matrix: row k holds token order[k] and the tokens in groups[order[k]]."""
    a = torch.zeros(len(order), n)
    for k, tok in enumerate(order):
        a[k, tok] = 1
        for j in groups.get(tok, []):
            a[k, j] = 1
    return a


def ref_step(method, x, size, k, v, w, r, p, layer, depth, option, decisions):
    """One reduction step of ``method`` for one image. Returns (x, size, assign)."""
    n = x.shape[0]
    metric = k.mean(0)
    if method in ("tome", "mlerp"):
        r = min(r, (n - p) // 2)
        x_new, size_new, assign = ref_merge(x, size, metric, r, p)
        if method == "mlerp":
            for row in range(assign.shape[0]):
                members = assign[row].nonzero().flatten().tolist()
                largest = max(x[j].norm() for j in members)
                x_new[row] = x_new[row] / x_new[row].norm() * largest
        return x_new, size_new, assign
    others = list(range(p, n))
    if method == "pitome":
        r = min(r, (n - p) // 2)
        margin = (0.75 if option is None else option) * (1 - layer / depth)
        m = F.normalize(metric[p:], dim=-1)
        cos = (m @ m.t()).tolist()
        energy = [sum(c - margin if c > margin else math.expm1(c - margin) for c in row) / (n - p) for row in cos]
        ranked = sorted(range(n - p), key=lambda i: (-energy[i], i))
        a_ids, b_ids = ranked[: 2 * r : 2], ranked[1 : 2 * r : 2]
        groups = {}
        for i in a_ids:
            best = max(b_ids, key=lambda j: (cos[i][j], -b_ids.index(j)))
            groups.setdefault(p + best, []).append(p + i)
        order = list(range(p)) + [p + i for i in ranked[2 * r:]] + [p + j for j in b_ids]
    elif method == "diffrate":
        r = min(r, n - p - 1)
        cls = w[:, 0].mean(0)
        ranked = sorted(others, key=lambda j: (-float(cls[j]), j))
        kept, merged = ranked[: n - p - r], ranked[n - p - r:]
        m = F.normalize(x, dim=-1)
        groups = {}
        for i in merged:
            best = max(kept, key=lambda j: (float(m[i] @ m[j]), -kept.index(j)))
            groups.setdefault(best, []).append(i)
        order = list(range(p)) + kept
    elif method == "ppt":
        r = min(r, (n - p) // 2)
        score = (w[:, 0] * v.norm(dim=-1)).sum(0)
        var = score[p:].var()
        threshold = 7e-5 if option is None else option
        decisions.append((bool(var < threshold), float(var)))
        if var < threshold:
            return ref_merge(x, size, metric, r, p)
        ranked = sorted(others, key=lambda j: (-float(score[j]), j))
        groups, order = {}, list(range(p)) + ranked[: n - p - r]
    elif method in ("atc", "atc_average"):
        # Agglomerative clustering with every linkage recomputed from the member pairs.
        r = min(r, n - p - 1)
        m = F.normalize(metric[p:], dim=-1)
        cos = (m @ m.t()).tolist()
        clusters = [[i] for i in range(n - p)]  # kept in the order of their lowest member
        for _ in range(r):
            best = None
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    pairs = [cos[i][j] for i in clusters[a] for j in clusters[b]]
                    link = min(pairs) if method == "atc" else sum(pairs) / len(pairs)
                    if best is None or link > best[0]:
                        best = (link, a, b)
            _, a, b = best
            clusters[a] = clusters[a] + clusters.pop(b)
        groups = {p + min(c): [p + j for j in c if j != min(c)] for c in clusters}
        order = list(range(p)) + [p + min(c) for c in clusters]
    else:
        raise AssertionError(method)
    assign = assignment(order, groups, n)
    new_size = assign @ size
    return (assign @ (x * size[:, None])) / new_size[:, None], new_size, assign


def ref_forward(model, img, method, r_schedule, option=None, decisions=None):
    """Logits, sizes and dense source matrix for one image [3, H, W]."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(img[None])))[0]
    p = model.num_prefix_tokens
    size = torch.ones(x.shape[0])
    source = torch.eye(x.shape[0])
    depth = len(model.blocks)
    decisions = [] if decisions is None else decisions
    for layer, (block, r) in enumerate(zip(model.blocks, r_schedule)):
        attn = block.attn
        h = block.norm1(x)
        n = h.shape[0]
        qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim)
        q, k, v = (qkv[:, i].transpose(0, 1) for i in range(3))
        q, k = attn.q_norm(q), attn.k_norm(k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim) + size.log()
        w = logits.softmax(-1)
        y = attn.norm((w @ v).transpose(0, 1).reshape(n, attn.attn_dim))
        if attn.gate is not None:
            y = y * attn.gate(h).sigmoid()
        x = x + block.ls1(attn.proj(y))
        if r > 0:
            x, size, assign = ref_step(method, x, size, k, v, w, r, p, layer, depth, option, decisions)
            source = assign @ source
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)
    if hasattr(model, "head_dist"):
        return (model.head(x[0]) + model.head_dist(x[1])) / 2, size, source
    if model.attn_pool is not None or model.global_pool not in ("token", "avg"):
        pooled = model.pool((source.t() @ x)[None])[0]
    elif model.global_pool == "token":
        pooled = x[0]
    else:
        pooled = (x[p:] * size[p:, None]).sum(0) / size[p:].sum()
    return model.head(model.fc_norm(pooled)), size, source


def check_against_reference(model, x, method, option=None):
    with torch.no_grad():
        got = model(x)
        trace = tokenslim.trace_merges(model, x)
        decisions = []
        for b in range(x.shape[0]):
            expected, size, source = ref_forward(model, x[b], method, model.tokenslim.r_schedule, option, decisions)
            diff = (got[b] - expected).abs().max().item()
            assert diff <= 1e-5, f"{method}: logits differ from the reference by {diff}"
            assert trace.sizes[b].tolist() == size.tolist()
            dense = tokenslim.source_matrix(trace.source[b:b + 1], trace.tokens.shape[1])[0]
            assert torch.equal(dense, source)
    return decisions


@pytest.mark.parametrize("method", ["mlerp", "pitome"])
def test_merge_methods_equal_reference_on_every_variant(variant, method):
    model = tokenslim.patch(make_model(variant), r=[6, 3, 8, 5], method=method)
    check_against_reference(model, images(2), method)


@pytest.mark.parametrize("method", ["atc", "atc_average"])
def test_atc_equals_reference_on_every_variant(variant, method):
    # Agglomerative clustering removes far more than half the tokens in one block when told to.
    model = tokenslim.patch(make_model(variant), r=[10, 30, 0, 12], method=method)
    assert model.tokenslim_plan(65 + model.num_prefix_tokens - 1).merged[1] == 30
    check_against_reference(model, images(2), method)


def test_atc_linkages_on_a_chain():
    # Points on an arc: 0 and 1 nearly equal; 2 is 0.10 from 1 and 0.12 from 0; 3 is 0.115 from 2.
    # Both linkages join 0 and 1 first. Then average linkage (mean similarity to 0 and 1) takes 2
    # into that pair, while complete linkage (the least similar member, 0) pairs 2 with 3 instead.
    angles = torch.tensor([0.0, 0.02, 0.12, 0.235, 1.5])
    metric = torch.stack([angles.cos(), angles.sin()], dim=-1)[None]
    assert cluster(metric, 1, "complete").tolist() == [[0, 0, 2, 3, 4]]
    assert cluster(metric, 2, "complete").tolist() == [[0, 0, 2, 2, 4]]
    assert cluster(metric, 2, "average").tolist() == [[0, 0, 0, 3, 4]]
    assert cluster(metric, 4, "average").tolist() == [[0] * 5]
    # Identical tokens tie: the first pair in row-major order joins, so plans are deterministic.
    same = torch.ones(2, 4, 3)
    assert cluster(same, 2, "complete").tolist() == [[0, 0, 0, 3]] * 2
    with pytest.raises(ValueError, match="linkage"):
        cluster(metric, 1, "single")
    with pytest.raises(ValueError, match=r"r must lie in \[0, 4\]"):
        cluster(metric, 5)


@pytest.mark.parametrize("variant", CLASS_VARIANTS)
def test_diffrate_equals_reference(variant):
    # DiffRate merges far more than half the tokens in one block when told to.
    model = tokenslim.patch(make_model(variant), r=[10, 30, 0, 12], method="diffrate")
    assert model.tokenslim_plan(65 + model.num_prefix_tokens - 1).merged[1] == 30
    check_against_reference(model, images(2), "diffrate")


def test_pitome_margin_option_changes_the_result_and_matches():
    model = tokenslim.patch(make_model("vit"), r=8, method="pitome", margin=0.3)
    check_against_reference(model, images(2), "pitome", option=0.3)


@pytest.mark.parametrize("variant", ["vit", "deit_distilled", "dinov2_registers"])
def test_ppt_both_branches_equal_reference(variant):
    model = make_model(variant)
    x = images(4, seed=3)
    schedule = [0, 6, 6, 6]
    # Threshold 0 prunes every image, a huge one merges every image: each branch alone first.
    for threshold, pooled in ((0.0, False), (1e9, True)):
        tokenslim.patch(model, r=schedule, method="ppt", threshold=threshold)
        decisions = check_against_reference(model, x, "ppt", option=threshold)
        assert {d for d, _ in decisions} == {pooled}
    # Then a threshold between the images' score variances at the first reducing block, so one
    # batch mixes pruned and pooled images.
    first = []
    with torch.no_grad():
        for b in range(4):
            seen = []
            ref_forward(model, x[b], "ppt", schedule, 0.0, seen)
            first.append(seen[0][1])
    low, high = sorted(first)[1:3]
    assert low < high
    threshold = (low + high) / 2
    tokenslim.patch(model, r=schedule, method="ppt", threshold=threshold)
    decisions = check_against_reference(model, x, "ppt", option=threshold)
    assert {d for d, _ in decisions} == {True, False}


def test_tome_method_is_the_default_and_exact():
    model = make_model("vit")
    x = images(2)
    with torch.no_grad():
        default = tokenslim.patch(model, r=8)(x)
        named = tokenslim.patch(model, r=8, method="tome")(x)
    assert torch.equal(default, named)
    assert model.tokenslim.method == "tome"


def _with_policy(model, method):
    """``method="learned"`` needs a trained merge policy: a random one here, so it is not ToMe."""
    if method == "learned":
        from tokenslim.merge_policy import attach_policy

        with torch.no_grad():
            for p in attach_policy(model).parameters():
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(7))
    return model


@pytest.mark.parametrize("method", method_names())
def test_r0_equals_unpatched_for_every_method(method):
    model = _with_policy(make_model("deit_distilled"), method)
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        got = tokenslim.patch(model, r=0, method=method)(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", method_names())
def test_methods_compose_with_pruning_channels_and_intermediates(method):
    from tokenslim.spec import apply_setting, parse_setting

    model = _with_policy(make_model("vit", depth=6), method)
    x = images(2)
    setting = parse_setting(f"r=4,method={method},keep_rate=0.8,prune_layers=(2,),fuse_pruned=true,mlp_pruned=0.25")
    apply_setting(model, setting)
    plan = model.tokenslim_plan(65)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x, indices=[1, 4], output_fmt="NLC")
    assert out.shape == (2, 10) and feats.shape == (2, 65, 48)
    assert [t.shape[1] for t in inter] == [plan.tokens[2] - 1, plan.tokens[5] - 1]
    torch.testing.assert_close(model.forward_head(feats), out)
    torch.testing.assert_close(final, feats)


def test_mlerp_merge_keeps_the_largest_norm():
    x = torch.tensor([[[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    dest = torch.tensor([[0, 0, 1]])
    merged, sizes = merge_tokens(x, None, dest, 2, norm="max")
    assert sizes.flatten().tolist() == [2.0, 1.0]
    torch.testing.assert_close(merged[0, 0].norm(), torch.tensor(3.0))
    torch.testing.assert_close(merged[0, 0] / merged[0, 0].norm(), torch.tensor([3.0, 1.0]) / math.sqrt(10))
    torch.testing.assert_close(merged[0, 1], x[0, 2])


def test_merge_tokens_drops_minus_one():
    x = torch.arange(8.0).view(1, 4, 2)
    merged, sizes = merge_tokens(x, None, torch.tensor([[0, -1, 1, 0]]), 2, has_dropped=True)
    assert merged[0].tolist() == [[3.0, 4.0], [4.0, 5.0]] and sizes.flatten().tolist() == [2.0, 1.0]


def test_method_errors_are_clear():
    with pytest.raises(ValueError, match="known methods: tome"):
        tokenslim.patch(make_model("vit"), r=4, method="tofu")
    with pytest.raises(ValueError, match="no class token"):
        tokenslim.patch(make_model("avg_no_class"), r=4, method="diffrate")
    with pytest.raises(ValueError, match="method='ppt'"):
        tokenslim.patch(make_model("vit"), r=4, threshold=1e-4)
    with pytest.raises(ValueError, match="method='pitome'"):
        tokenslim.patch(make_model("vit"), r=4, method="ppt", margin=0.5)
    model = tokenslim.patch(make_model("vit"), r=4, method="ppt", threshold=1e-3)
    with pytest.raises(ValueError, match="threshold"):
        model.tokenslim.method = "tome"  # the threshold would silently stop meaning anything
    assert model.tokenslim.method == "ppt"
    assert get_method("PiToMe").name == "pitome"


@pytest.mark.parametrize("method", method_names())
def test_patched_model_pickles_with_every_method(method):
    import pickle

    model = tokenslim.patch(_with_policy(make_model("vit"), method), r=4, method=method)
    x = images(2)
    copy = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        assert torch.equal(copy(x), model(x))
