import pytest

from tokenslim import parse_r, plan_tokens


def test_int_schedule():
    assert parse_r(16, 12) == (16,) * 12


def test_list_schedule_zero_padded():
    assert parse_r([4, 3], 4) == (4, 3, 0, 0)


def test_ramp_matches_tome_example():
    # ToMe: (16, -1) on 12 blocks = 32, 29, ..., 2, 0.
    assert parse_r((16, -1), 12) == (32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0)
    assert parse_r((16, 0), 12) == (16,) * 12
    assert parse_r((16, 1), 12) == (0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32)


def test_vit_b16_token_counts_r16():
    plan = plan_tokens(197, 1, parse_r(16, 12))
    assert plan.tokens == tuple(range(197, 20, -16)) + (11,)
    assert plan.merged[-1] == 10 and plan.reduces


def test_clamp_respects_prefix():
    # 5 prefix tokens + 6 mergeable: at most 3 per block.
    plan = plan_tokens(11, 5, [10, 10, 10])
    assert plan.tokens == (11, 8, 7, 6) and plan.merged == (3, 1, 1)


@pytest.mark.parametrize(
    "bad, exc",
    [(-1, ValueError), ([1, -2], ValueError), ([1] * 13, ValueError), ((4, 2.0), ValueError),
     ("8", TypeError), (1.5, TypeError), (True, TypeError), ((1, 2, 3), TypeError), ([1.0], TypeError),
     (None, TypeError)],
)
def test_bad_r(bad, exc):
    with pytest.raises(exc):
        parse_r(bad, 12)


def test_plans_are_cached_per_setting_and_dropped_flags():
    from tokenslim import ReductionSettings

    s = ReductionSettings(12, r=8)
    first = s.plan(197, 1)
    assert s.plan(197, 1) is first  # computed once per setting
    s.r = 4
    assert s.plan(197, 1).merged == (4,) * 12  # a new setting invalidates the cache
    s.keep_rate = 0.5
    assert s.plan(197, 1).dropped == (False,) * 3 + (True,) * 9 and s.plan(197, 1).drops
    s.fuse_pruned = True
    assert not any(s.plan(197, 1).dropped) and not s.plan(197, 1).drops
