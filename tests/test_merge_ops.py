"""One matching + merge step against a plain per-image reference, and the merge invariants."""
import pytest
import torch

from tokenslim.ops import (
    bipartite_soft_matching,
    merge_tokens,
    sizes_from_source,
    source_matrix,
    unmerge,
    update_source,
)


def reference_step(x, sizes, metric, r, prefix):
    """ToMe's step written plainly, one image at a time, with Python lists.

    Returns merged tokens, sizes and, for every input token, its output slot.
    """
    n = x.shape[0]
    r = min(r, (n - prefix) // 2)
    if r == 0:  # nothing to merge: a no-op, no reordering
        return x.double(), sizes.double(), list(range(n))
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_idx = [i for i in range(n) if i % 2 == 0]
    b_idx = [i for i in range(n) if i % 2 == 1]
    best = {}
    for i in a_idx:
        if i < prefix:
            continue
        cands = [(float(m[i] @ m[j]), j) for j in b_idx if j >= prefix]
        score = max(c[0] for c in cands)
        partner = next(j for s, j in cands if s == score)  # first maximum, like torch.max
        best[i] = (score, partner)
    # Highest scores first; ties broken by lower index.
    ranked = sorted(best, key=lambda i: (-best[i][0], i))
    merged_away = set(ranked[:r])
    order = [i for i in range(prefix)]
    order += [i for i in a_idx if i >= prefix and i not in merged_away]
    order += [j for j in b_idx if j >= prefix]
    slot = {tok: k for k, tok in enumerate(order)}
    for i in merged_away:
        slot[i] = slot[best[i][1]]
    out = torch.zeros(len(order), x.shape[1], dtype=torch.float64)
    out_sizes = torch.zeros(len(order), dtype=torch.float64)
    for i in range(n):
        out[slot[i]] += x[i].double() * sizes[i]
        out_sizes[slot[i]] += sizes[i]
    return out / out_sizes[:, None], out_sizes, [slot[i] for i in range(n)]


@pytest.mark.parametrize("prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("n, r", [(17, 4), (16, 8), (20, 0), (9, 20)])
def test_step_equals_plain_reference(prefix, n, r):
    torch.manual_seed(n * 10 + prefix)
    x = torch.randn(3, n, 8)
    metric = torch.randn(3, n, 6)
    sizes = torch.randint(1, 4, (3, n, 1)).float()
    plan = bipartite_soft_matching(metric, r, prefix)
    out, out_sizes = merge_tokens(x, sizes, plan.dest, plan.num_out)
    for b in range(3):
        ref, ref_sizes, ref_slots = reference_step(x[b], sizes[b, :, 0], metric[b], r, prefix)
        assert plan.dest[b].tolist() == ref_slots
        torch.testing.assert_close(out[b].double(), ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out_sizes[b, :, 0].double(), ref_sizes)


def test_invariants():
    torch.manual_seed(0)
    x = torch.randn(2, 33, 16)
    prefix = 1
    sizes, source = None, None
    n = x.shape[1]
    for r in [8, 8, 4]:
        metric = torch.randn(2, x.shape[1], 8)
        before = x.clone()
        w_before = (x * (sizes if sizes is not None else 1)).sum(1)
        plan = bipartite_soft_matching(metric, r, prefix)
        x, sizes = merge_tokens(x, sizes, plan.dest, plan.num_out)
        source = update_source(source, plan.dest)
        assert x.shape[1] == before.shape[1] - r
        # The size-weighted feature sum is preserved.
        torch.testing.assert_close((x * sizes).sum(1), w_before, atol=1e-4, rtol=1e-5)
        # Prefix tokens come first and are unchanged.
        assert torch.equal(x[:, :prefix], before[:, :prefix])
        assert torch.equal(sizes[:, :prefix], torch.ones(2, prefix, 1))
    assert torch.equal(sizes.sum(1), torch.full((2, 1), float(n)))
    assert torch.equal(sizes, sizes_from_source(source, x.shape[1]))
    assert torch.equal(source_matrix(source, x.shape[1]).sum(-1, keepdim=True), sizes)
    # Unmerging then taking a plain mean is the size-weighted mean.
    torch.testing.assert_close(unmerge(x, source).mean(1), (x * sizes).sum(1) / n)


def test_merge_is_differentiable():
    x = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)
    plan = bipartite_soft_matching(torch.randn(1, 9, 4), 3, 1)
    out, _ = merge_tokens(x.float(), None, plan.dest, plan.num_out)
    out.sum().backward()
    # Each input token contributes 1/size of its output token per channel.
    sizes = sizes_from_source(plan.dest, plan.num_out)[0, :, 0]
    expected = (1.0 / sizes[plan.dest[0]]).double()
    torch.testing.assert_close(x.grad[0, :, 0], expected)


def test_bad_inputs():
    with pytest.raises(ValueError, match="metric"):
        bipartite_soft_matching(torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match="r must"):
        bipartite_soft_matching(torch.randn(1, 4, 5), -1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        bipartite_soft_matching(torch.randn(1, 4, 5), 1, 7)
