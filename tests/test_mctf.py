"""MCTF (method="mctf"): the batched matching against a plain per-image reference written here,
its limits (ToMe's partition when only similarity counts and matching is one-way), and the
method on patched models (exact token counts, every adapter family)."""
import copy
import math

import pytest
import torch

import tokenslim
from conftest import make_model
from tokenslim.methods.mctf import TAU_INFO, TAU_SIM, TAU_SIZE, mctf_matching
from tokenslim.ops.matching import bipartite_soft_matching


def _reference(keys, r, p, received, sizes, tau_sim=TAU_SIM, tau_info=TAU_INFO, tau_size=TAU_SIZE,
               bidirectional=True):
    """One image at a time, in plain Python: the groups MCTF forms, as ``{destination: members}``
    over token indices (the destination is the token that is kept)."""
    n = len(keys)
    r = min(r, (n - p) // 2)
    unit = [k / k.norm() for k in keys.double()]
    inv_rec = [1 / float(v) for v in received]
    inv_size = [1 / float(s) for s in sizes]
    top_rec, top_size = max(inv_rec[p:]), max(inv_size[p:])

    def attraction(a, b):
        if a < p or b < p:
            return -math.inf
        w = ((float(unit[a] @ unit[b]) + 1) / 2) ** (1 / tau_sim)
        w *= (inv_rec[a] / top_rec * inv_rec[b] / top_rec) ** (1 / tau_info)
        return w * (inv_size[a] / top_size * inv_size[b] / top_size) ** (1 / tau_size)

    a_set, b_set = list(range(0, n, 2)), list(range(1, n, 2))
    r1 = r // 2 if bidirectional else r
    # Each A's best B (first on ties), then the r1 A tokens of highest attraction (first on ties).
    best = {a: max(b_set, key=lambda b: (attraction(a, b), -b)) for a in a_set}
    order = sorted(a_set, key=lambda a: (-attraction(a, best[a]), a))
    merged_a = order[:r1]
    left_a = [a for a in a_set if a not in merged_a]
    best_b = {b: max(left_a, key=lambda a: (attraction(a, b), -a)) for b in b_set}
    order_b = sorted(b_set, key=lambda b: (-attraction(best_b[b], b), b))
    merged_b = order_b[:r - r1]
    final = {t: t for t in range(n)}
    for b in merged_b:
        final[b] = best_b[b]
    for a in merged_a:
        final[a] = final[best[a]]
    groups = {}
    for t in range(n):
        groups.setdefault(final[t], set()).add(t)
    return groups


@pytest.mark.parametrize("p, r, bidirectional", [(1, 6, True), (1, 7, True), (2, 5, True), (0, 8, False), (4, 3, True)])
def test_batched_matching_equals_the_per_image_reference(p, r, bidirectional):
    g = torch.Generator().manual_seed(p * 10 + r)
    batch, n, c = 3, 25, 8
    keys = torch.randn(batch, n, c, generator=g)
    keys[:, 5] = keys[:, 9] + 0.01 * torch.randn(batch, c, generator=g)  # a clear pair
    received = torch.rand(batch, n, generator=g) + 0.05
    sizes = torch.randint(1, 4, (batch, n, 1), generator=g).float()
    # Strong informativeness and size terms (small tau) so that they change the groups.
    kw = dict(tau_sim=1.0, tau_info=2.0, tau_size=3.0, bidirectional=bidirectional)
    plan = mctf_matching(keys, r, p, received, sizes, **kw)
    assert plan.num_out == n - r
    for i in range(batch):
        expected = _reference(keys[i], r, p, received[i], sizes[i, :, 0], **kw)
        got = {}
        for t, d in enumerate(plan.dest[i].tolist()):
            got.setdefault(d, set()).add(t)
        assert {frozenset(v) for v in got.values()} == {frozenset(v) for v in expected.values()}
        assert sorted(got) == list(range(n - r))  # every slot used once
        assert [plan.dest[i, t].item() for t in range(p)] == list(range(p))  # prefix first, in order


def test_similarity_alone_one_way_is_tome():
    """With informativeness and size off and one-way matching, MCTF forms ToMe's groups (the
    attraction is a monotone function of the cosine similarity)."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 33, 16, generator=g)
    mctf = mctf_matching(keys, 9, 1, None, None, tau_info=math.inf, tau_size=math.inf, bidirectional=False)
    tome = bipartite_soft_matching(keys, 9, 1)
    assert torch.equal(mctf.dest, tome.dest)


def test_informativeness_merges_tokens_nobody_attends_to_first():
    """Two A tokens equally similar to their B partners: the one receiving less attention merges."""
    keys = torch.zeros(1, 9, 2)
    keys[0, :, 0] = 1.0
    keys[0, 1:, 1] = torch.tensor([0.0, 5.0, -5.0, 3.0, -3.0, 3.0, -3.0, 0.5])  # A: 2, 4, 6, 8; B: 1, 3, 5, 7
    received = torch.ones(1, 9)
    received[0, 4] = 0.01  # token 4 (A) is barely attended to
    plan = mctf_matching(keys, 1, 1, received, None, tau_sim=1.0, tau_info=1.0, bidirectional=False)
    merged = [t for t in range(1, 9) if (plan.dest[0] == plan.dest[0, t]).sum() > 1]
    assert 4 in merged


@pytest.mark.parametrize("variant", ["vit", "dinov2_registers", "deit_distilled", "eva02"])
def test_mctf_on_patched_models_removes_exactly_r(variant):
    if variant == "eva02":
        from test_eva import make_eva

        model = make_eva(variant)
    else:
        model = make_model(variant)
    x = torch.randn(2, 3, 32, 32)
    plain = copy.deepcopy(model)
    tokenslim.patch(model, r=3, method="mctf")
    plan = tokenslim.token_plan(model)
    counts = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
    for block in list(model.blocks)[1:]:
        block.register_forward_pre_hook(lambda m, a: counts.append(a[0].shape[1]))
    with torch.no_grad():
        out = model(x)
        assert counts == list(plan.tokens[:len(model.blocks)])  # tokens entering every block
        features = model.forward_features(x)
    assert out.shape == plain(x).shape and features.shape == plain.forward_features(x).shape
    tokenslim.patch(model, r=0, method="mctf")
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # nothing reduced: the unpatched model exactly


def test_mctf_in_settings_text_and_on_transformers():
    setting = tokenslim.parse_setting("r=4,method=mctf")
    assert setting["method"] == "mctf"
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=4, num_labels=10)
    model = transformers.ViTForImageClassification(config).eval()
    tokenslim.patch(model, r=4, method="mctf")
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert out.shape == (2, 10) and torch.isfinite(out).all()
