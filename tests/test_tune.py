"""tune: the search logic on a tiny model, with a deterministic stand-in for the timer (speed is
measured in benchmarks, never asserted in unit tests)."""
import pytest
import torch
from torch.utils.data import TensorDataset

import tokenslim.tune as tune_module
import tokenslim.tune.scoring as tune_search  # evaluation and timing live in scoring
from conftest import images, make_model
from tokenslim.measure.benchmark import Comparison, RatioEstimate
from tokenslim.measure.macs import count_macs
from tokenslim.spec import apply_setting, parse_setting


def _data(n=16):
    return TensorDataset(images(n, seed=5), torch.arange(n) % 10)


def _fake_device(monkeypatch, efficiency):
    """A 'device' whose speed-up is efficiency x the MAC ratio, so the search must correct for it."""
    def fake_compare(models, baseline, **kw):
        base = count_macs(models[baseline]).gmacs
        out = {}
        for name, m in models.items():
            ratio = base / count_macs(m).gmacs * (efficiency if name != baseline else 1.0)
            out[name] = RatioEstimate(ratio, ratio * 0.98, ratio * 1.02, 0.95, 15)
        return Comparison(baseline, out, {}, {}, {}, None)

    monkeypatch.setattr(tune_search, "compare", fake_compare)


def test_meets_a_speed_target_after_correcting_for_efficiency(monkeypatch, tmp_path):
    _fake_device(monkeypatch, efficiency=0.8)
    model = make_model("vit", depth=6)
    result = tune_module.tune(model, _data(), speedup=1.3, methods=["tome"], step=4, out_dir=str(tmp_path),
                              search=("merge",))
    assert result.best.throughput_ratio >= 1.3  # the re-measurement meets the target
    assert result.best.mac_ratio >= 1.3 / 0.8 * 0.99
    # The setting is settings text that patches a model to the same compute.
    patched = apply_setting(make_model("vit", depth=6), parse_setting(result.setting))
    assert count_macs(patched).gmacs == pytest.approx(result.best.gmacs)
    assert (tmp_path / "candidates.csv").exists() and (tmp_path / "tune.json").exists()


def test_greedy_spends_reduction_where_it_costs_least(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    model = make_model("vit", depth=6)
    # Plant the sensitivity: the last two blocks barely change the output, so merging before them
    # costs nearly nothing; blocks 0-3 carry the signal.
    with torch.no_grad():
        for block in model.blocks[4:]:
            for p in block.parameters():
                p.mul_(1e-3)
    result = tune_module.tune(model, _data(), speedup=1.15, methods=["tome"], step=4)
    r = parse_setting(result.setting)["r"]
    assert sum(r[:3]) <= sum(r[3:]), f"expected the reduction late in the network, got {r}"


def test_max_drop_zero_keeps_every_prediction(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    model = make_model("vit", depth=4)
    result = tune_module.tune(model, _data(), speedup=None, max_drop=0.0, methods=["tome"], step=4)
    assert result.best.top1_diff == 0.0 or result.best.agreement == 100.0
    assert result.best.throughput_ratio is not None


def test_resume_replays_finished_candidates(monkeypatch, tmp_path):
    _fake_device(monkeypatch, efficiency=0.9)
    model = make_model("vit", depth=6)
    calls = []
    real = tune_search.evaluate
    monkeypatch.setattr(tune_search, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []

    def kill_after_five(msg):
        seen.append(msg)
        if len(calls) > 5:
            raise KeyboardInterrupt

    kw = dict(speedup=1.2, methods=["tome"], step=4, out_dir=str(tmp_path), search=("merge", "prune"))
    with pytest.raises(KeyboardInterrupt):
        tune_module.tune(model, _data(), **kw,
                         progress=kill_after_five)
    before = len(calls)
    calls.clear()
    full = tune_module.tune(model, _data(), **kw)
    resumed_calls = len(calls)
    calls.clear()
    fresh = tune_module.tune(model, _data(), **kw,
                             fresh=True)
    assert fresh.setting == full.setting
    # The resumed run did not redo the candidates finished before the kill (1 call: calibration).
    assert resumed_calls == len(calls) - (before - 1)
    calls.clear()
    tune_module.tune(model, _data(), **kw)
    assert len(calls) == 1  # everything replayed; only the unpatched calibration outputs


def test_bad_targets_are_refused():
    model = make_model("vit")
    with pytest.raises(ValueError, match="exactly one target"):
        tune_module.tune(model, _data(), speedup=1.5, max_drop=1.0)
    with pytest.raises(ValueError, match="must be > 1"):
        tune_module.tune(model, _data(), speedup=0.9)
    with pytest.raises(ValueError, match="unknown method"):
        tune_module.tune(model, _data(), methods=["nope"])


def test_pruning_the_last_block_of_a_class_token_model_is_found_first(monkeypatch):
    # After the last block's attention only the class token is read: pruning there is exact.
    _fake_device(monkeypatch, efficiency=1.0)
    model = make_model("vit", depth=4)
    result = tune_module.tune(model, _data(), speedup=1.1, methods=["tome"], step=4, search=("prune",))
    setting = parse_setting(result.setting)
    assert setting["prune_layers"] == (3,) and setting["keep_rate"][0] < 1.0, result.setting
    assert result.best.kl < 1e-9 and result.best.agreement == 100.0
    # and the pruned model's logits are the unpatched ones
    x = images(4, seed=2)
    with torch.no_grad():
        assert torch.allclose(apply_setting(make_model("vit", depth=4), setting)(x), model(x), atol=1e-5)


def test_mlp_channels_in_the_search(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    model = make_model("vit", depth=4)
    result = tune_module.tune(model, _data(), speedup=1.1, methods=["tome"], step=4, search=("mlp",))
    setting = parse_setting(result.setting)
    assert setting["mlp_pruned"] > 0 and setting["r"] == [0, 0, 0, 0]
    # The setting text rebuilds the same (materialised) compute.
    patched = apply_setting(make_model("vit", depth=4), setting)
    assert count_macs(patched).gmacs == pytest.approx(result.best.gmacs)


def test_no_pruning_where_the_head_pools_patches(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    model = make_model("avg_no_class", depth=4)
    result = tune_module.tune(model, _data(), speedup=1.1, methods=["tome"], step=4, search=("merge", "prune"))
    assert all("keep_rate" not in c.setting for c in result.candidates)


def test_unknown_search_space_is_refused():
    with pytest.raises(ValueError, match="search takes"):
        tune_module.tune(make_model("vit"), _data(), search=("merge", "heads"))


def test_an_overshoot_is_approached_again_in_smaller_steps(monkeypatch):
    # A device that is slow for light settings and efficient for heavy ones: the first timing falls
    # short, the corrected MAC goal then overshoots; the search goes back and approaches in half steps.
    def fake_compare(models, baseline, **kw):
        base = count_macs(models[baseline]).gmacs
        out = {}
        for name, m in models.items():
            mac = base / count_macs(m).gmacs
            ratio = 1.0 if name == baseline else mac * (0.7 if mac < 1.3 else 1.0)
            out[name] = RatioEstimate(ratio, ratio * 0.98, ratio * 1.02, 0.95, 15)
        return Comparison(baseline, out, {}, {}, {}, None)

    monkeypatch.setattr(tune_search, "compare", fake_compare)
    model = make_model("vit", depth=6)
    msgs = []
    result = tune_module.tune(model, _data(), speedup=1.2, methods=["tome"], step=8, search=("merge",),
                              margin=0.0, progress=msgs.append)
    assert any("overshoots" in m and "steps of 4" in m for m in msgs), msgs
    overshoot = max(c.throughput_ratio or 0 for c in result.candidates)
    assert 1.2 <= result.best.throughput_ratio < overshoot


def test_plain_schedules_challenge_the_search(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    model = make_model("vit", depth=6)
    result = tune_module.tune(model, _data(), speedup=1.3, methods=["tome"], step=4, search=("merge", "prune"))
    challengers = [c for c in result.candidates if c.phase == "challenge"]
    assert challengers
    # no plain schedule at the same or lower compute has a lower KL than the point chosen
    chosen = result.best
    same_compute = [c for c in challengers if c.gmacs <= chosen.gmacs * 1.002]
    assert same_compute and all(c.kl >= chosen.kl - 1e-12 for c in same_compute)


def test_plain_schedules_contest_the_point_at_measured_speed(monkeypatch):
    # A device on which uneven schedules run at 60% of their MAC ratio and plain ones at 100%: at
    # equal MACs the search's point may win on KL, at equal measured speed a plain schedule must.
    from tokenslim.schedule import parse_r

    def is_plain(r):
        return any(list(r) in (list(parse_r(k, 6)), list(parse_r((k, -1), 6))) for k in range(0, 40))

    def fake_compare(models, baseline, **kw):
        base = count_macs(models[baseline]).gmacs
        out = {}
        for name, m in models.items():
            mac = base / count_macs(m).gmacs
            plain = name == baseline or is_plain(m.tokenslim.r)
            ratio = 1.0 if name == baseline else mac * (1.0 if plain else 0.6)
            out[name] = RatioEstimate(ratio, ratio * 0.98, ratio * 1.02, 0.95, 15)
        return Comparison(baseline, out, {}, {}, {}, None)

    monkeypatch.setattr(tune_search, "compare", fake_compare)
    model = make_model("vit", depth=6)
    result = tune_module.tune(model, _data(), speedup=1.3, methods=["tome"], step=4, search=("merge",))
    contest = [c for c in result.candidates if c.phase == "contest" and c.throughput_ratio is not None]
    assert contest, "no plain schedule was timed"
    assert is_plain(parse_setting(result.setting)["r"]), result.setting
    assert result.best.throughput_ratio >= 1.3
    # the winner has the lowest KL among the timed points that reach the aim
    reached = [c for c in result.candidates if (c.throughput_ratio or 0) >= 1.3 * 1.03]
    assert result.best.kl <= min(c.kl for c in reached) + 1e-12
