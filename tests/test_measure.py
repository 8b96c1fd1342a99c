"""GMAC counting, token plans and the side-by-side timer."""
import copy
import json

import pytest
import timm
import torch

import tokenslim
from conftest import make_model
from tokenslim.measure import benchmark, compare, count_macs, median_interval
from tokenslim.measure.table import benchmark_settings, format_rows
from tokenslim.spec import format_setting, parse_setting


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


@pytest.mark.parametrize("name, expected", [("deit_small_patch16_224", 4.6), ("vit_base_patch16_224", 17.58)])
def test_gmacs_match_papers(name, expected):
    cost = count_macs(meta_model(name))
    assert abs(cost.gmacs - expected) <= 0.05, cost
    assert "multiply-add" in cost.unit


def analytic_gmacs(tokens, dim=768, mlp=3072, patches=196, patch=16, classes=1000):
    """Linear layers and attention matmuls of a ViT; ``tokens`` enter each block, then leave the last.

    ToMe merges after attention: a block's attention sees tokens[i], its MLP tokens[i + 1].
    """
    macs = patches * dim * 3 * patch * patch + dim * classes
    for n, n_out in zip(tokens[:-1], tokens[1:]):
        macs += n * dim * 3 * dim + n * dim * dim + 2 * n * n * dim + 2 * n_out * dim * mlp
    return macs / 1e9


def test_gmacs_follow_tome_schedule():
    model = meta_model("vit_base_patch16_224")
    assert abs(count_macs(model).gmacs - analytic_gmacs([197] * 13)) / count_macs(model).gmacs < 0.01
    tokenslim.patch(model, r=16)
    plan = tokenslim.token_plan(model)
    assert plan.tokens == tuple(range(197, 20, -16)) + (11,)
    got = count_macs(model).gmacs
    assert abs(got - analytic_gmacs(plan.tokens)) / got < 0.01
    assert 8.7 < got < 8.9


def test_narrower_layers_are_counted():
    model = make_model("vit")  # embed 48, MLP hidden 192, 65 tokens, 4 blocks
    before = count_macs(model)
    block = model.blocks[0]
    block.mlp.fc1 = torch.nn.Linear(48, 96)
    block.mlp.fc2 = torch.nn.Linear(96, 48)
    after = count_macs(model)
    assert abs((before.gmacs - after.gmacs) * 1e9 - 65 * 2 * 48 * 96) < 1
    assert before.params_m - after.params_m == pytest.approx((2 * 48 * 96 + 96) / 1e6)


def test_cpu_fused_attention_is_counted():
    model = make_model("vit")
    x = torch.randn(1, 3, 32, 32)
    from torch.utils.flop_counter import FlopCounterMode
    from tokenslim.measure.macs import _custom_mapping

    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() / 2e9 == pytest.approx(count_macs(model).gmacs, rel=1e-9)


def test_token_plan_unpatched_and_other_size():
    model = make_model("dynamic_img")
    assert tokenslim.token_plan(model).tokens == (65,) * 5
    tokenslim.patch(model, r=6)
    assert tokenslim.token_plan(model, img_size=48).tokens == (145, 139, 133, 127, 121)


def test_median_interval():
    med, lo, hi = median_interval(list(range(1, 16)))
    assert med == 8 and lo < med < hi
    with pytest.raises(ValueError):
        median_interval([1, 2, 3])


def test_timer_ratio_of_model_and_its_copy_is_near_one():
    model = make_model("vit")
    result = compare({"a": model, "b": copy.deepcopy(model)}, batch_size=8, rounds=15,
                     steps_per_round=3, device="cpu")
    est = result.throughput["b"]
    # The interval should hold 1; a broken timer (one model timed twice, wrong pairing) would
    # give ratios far from 1.
    assert est.low <= 1.0 <= est.high or abs(est.median - 1) < 0.05, est
    json.dumps(result.to_dict())


def test_benchmark_records_context():
    result = benchmark(make_model("vit"), batch_size=4, warmup=1, steps=3, latency_steps=3, device="cpu")
    assert result.samples_per_sec > 0 and result.latency_ms_median > 0
    ctx = result.context
    assert (ctx.batch_size, ctx.img_size, ctx.device, ctx.precision) == (4, (32, 32), "cpu", "float32")
    assert ctx.cpu_threads == torch.get_num_threads()
    json.dumps(result.to_dict())


def test_benchmark_bf16_and_channels_last():
    result = benchmark(make_model("vit"), batch_size=2, warmup=1, steps=2, latency_steps=0, device="cpu",
                       precision="amp_bfloat16", channels_last=True)
    assert result.samples_per_sec > 0


def test_bad_arguments():
    model = make_model("vit")
    with pytest.raises(ValueError, match="two"):
        compare({"a": model})
    with pytest.raises(ValueError, match="baseline"):
        compare({"a": model, "b": model}, baseline="c")
    with pytest.raises(ValueError, match="rounds"):
        compare({"a": model, "b": model}, rounds=3)
    with pytest.raises(ValueError, match="precision"):
        benchmark(model, precision="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        benchmark(model, batch_size=0)
    with pytest.raises(ValueError, match="img_size"):
        count_macs(model, img_size=(1, 2, 3))


def test_settings_text_round_trip_and_errors():
    for text in ["r=16", "r=(16,-1)", "r=[8,8,8],prop_attn=False"]:
        assert format_setting(parse_setting(text)) == text
    assert parse_setting("none") == {}
    for bad in ["r", "q=3", "r=abc"]:
        with pytest.raises(ValueError):
            parse_setting(bad)


def test_benchmark_settings_rows():
    rows = benchmark_settings(make_model("vit"), ["r=8"], model_name="tiny", batch_size=4, rounds=15,
                              device="cpu", latency=False)
    assert [r["setting"] for r in rows] == ["none", "r=8"]
    assert rows[0]["mac_ratio"] == 1.0 and rows[1]["mac_ratio"] > 1.3
    assert rows[1]["efficiency"] == pytest.approx(rows[1]["throughput_ratio"] / rows[1]["mac_ratio"])
    json.dumps(rows)
    assert "r=8" in format_rows(rows)
