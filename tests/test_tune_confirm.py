"""tune's confirmation step: images the search never saw decide, and plain ToMe is left only on evidence."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

import tokenslim.tune as tune_module
import tokenslim.tune.confirm as tune_confirm
import tokenslim.tune.scoring as tune_search  # evaluation and timing live in scoring
from conftest import images, make_model
from test_tune import _fake_device
from tokenslim.tune.confirm import DEFAULT_Z, decide, level, paired, per_image_kl, split_indices


def _data(n=128):
    return TensorDataset(images(n, seed=5), torch.arange(n) % 10)


def test_split_is_deterministic_disjoint_and_complete():
    search, confirm = split_indices(1000, 0.25, seed=3)
    assert len(confirm) == 250 and len(search) == 750
    assert not set(search) & set(confirm) and sorted(search + confirm) == list(range(1000))
    assert split_indices(1000, 0.25, seed=3) == (search, confirm)
    assert split_indices(1000, 0.25, seed=4)[1] != confirm
    assert split_indices(10, 0.0, seed=0) == (list(range(10)), [])
    with pytest.raises(ValueError, match="confirm share"):
        split_indices(10, 1.0, 0)


def test_per_image_kl_and_paired_difference_by_hand():
    ref = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    out = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    kl = per_image_kl(ref, out)
    p = torch.tensor([2.0, 0.0]).softmax(-1).double()
    assert kl[0].item() == pytest.approx(float((p * (p.log() - torch.tensor([0.5, 0.5]).double().log())).sum()))
    assert kl[1].item() == pytest.approx(0.0, abs=1e-12)
    mean, se = paired([1.0, 2.0, 3.0, 6.0], [1.0, 1.0, 1.0, 1.0])
    assert mean == pytest.approx(2.0) and se == pytest.approx(torch.tensor([0.0, 1, 2, 5]).std().item() / 2)


def test_levels_order_reductions_by_how_invasive_they_are():
    assert level("r=[4,4,4,4]", "r=[4,4,4,4]") == 0
    assert level("r=[6,4,2,0]") == 1 and level("r=[6,4,2,0],method=diffrate") == 1
    assert level("r=[2,2,2,2],keep_rate=[0.5],prune_layers=(3,)") == 2
    assert level("r=[2,2,2,2],mlp_pruned=0.125") == 3


def _kls(base, shift, n=100, noise=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (base + shift + noise * torch.randn(n, generator=g)).clamp(min=0).tolist()


def test_rule_keeps_the_incumbent_unless_the_unseen_images_say_otherwise():
    inc = "r=[4,4,4,4]"
    base = _kls(0.05, 0.0, seed=1)
    # The search's favourite (lowest search KL) is worse on the unseen images: not returned.
    worse = {inc: base, "r=[8,4,2,0]": [v + 0.01 for v in base]}
    chosen, tested, reason = decide([(inc, 0.050), ("r=[8,4,2,0]", 0.030)], worse, inc)
    assert chosen == inc and "kept plain ToMe" in reason and tested[1].diff > 0
    # Better, but within noise: cannot tell, the incumbent stays.
    g = torch.Generator().manual_seed(2)
    close = {inc: base, "r=[8,4,2,0]": [v - 0.001 + 0.02 * float(torch.randn(1, generator=g)) for v in base]}
    chosen, tested, _ = decide([(inc, 0.05), ("r=[8,4,2,0]", 0.03)], close, inc)
    assert chosen == inc and tested[1].diff < 0 and tested[1].diff + DEFAULT_Z * tested[1].se >= 0
    # Clearly better: left on evidence.
    clear = {inc: base, "r=[8,4,2,0]": [v - 0.01 for v in base]}
    chosen, tested, reason = decide([(inc, 0.05), ("r=[8,4,2,0]", 0.03)], clear, inc)
    assert chosen == "r=[8,4,2,0]" and "beats r=[4,4,4,4]" in reason
    # Channel pruning must beat the schedule it would replace, not only plain ToMe.
    channels = "r=[6,4,2,0],mlp_pruned=0.125"
    kls = {**clear, channels: [v - 0.0001 for v in clear["r=[8,4,2,0]"]]}
    kls[channels] = [v + 0.003 * (1 if i % 2 else -1) for i, v in enumerate(kls[channels])]
    chosen, tested, _ = decide([(inc, 0.05), ("r=[8,4,2,0]", 0.03), (channels, 0.01)], kls, inc)
    assert chosen == "r=[8,4,2,0]" and tested[-1].setting == channels and tested[-1].against == "r=[8,4,2,0]"


def _planted_tune(monkeypatch, tmp_path=None, **kw):
    """diffrate candidates are planted to look perfect on the searched images (the unpatched
    outputs) and to be poor on every other image: a winner's curse made certain."""
    _fake_device(monkeypatch, efficiency=0.9)
    model = make_model("vit", depth=4)
    real = tune_search.evaluate
    calls = {"confirm": 0}

    def planted(m, data, **k):
        planted_here = getattr(getattr(m, "tokenslim", None), "method", None) == "diffrate"
        if planted_here and k.get("reference_logits") is not None and len(data) == 96:
            return real(model, data, **k)  # the searched images: exactly the unpatched outputs
        res = real(m, data, **k)
        if len(data) == 32 and k.get("reference_logits") is not None:
            calls["confirm"] += 1
            if planted_here and res.logits is not None:
                res.logits = res.logits + 3.0 * torch.randn(res.logits.shape, generator=torch.Generator().manual_seed(0))
        return res

    monkeypatch.setattr(tune_search, "evaluate", planted)
    monkeypatch.setattr(tune_confirm, "evaluate", planted)
    result = tune_module.tune(model, _data(), speedup=1.3, methods=["tome", "diffrate"], step=4,
                              search=("merge",), out_dir=str(tmp_path) if tmp_path else None, **kw)
    return result, calls


def test_a_candidate_best_on_the_search_part_only_is_not_returned(monkeypatch, tmp_path):
    result, calls = _planted_tune(monkeypatch, tmp_path)
    conf = result.confirmation
    assert conf is not None and conf.confirm_images == 32 and conf.search_images == 96
    planted = [f for f in conf.finalists if "diffrate" in f.setting]
    assert planted and planted[0].search_kl < min(f.search_kl for f in conf.finalists if "diffrate" not in f.setting)
    assert "diffrate" not in result.setting
    assert planted[0].diff is not None and planted[0].diff > 0 and not planted[0].accepted
    assert conf.scored == result.evaluated and conf.chosen == result.setting
    saved = json.loads((tmp_path / "tune.json").read_text())["confirmation"]
    assert saved["chosen"] == result.setting and saved["confirm_images"] == 32 and len(saved["finalists"]) >= 2
    # Resume keeps the split: the confirmation rows are replayed, nothing is evaluated again.
    again, calls2 = _planted_tune(monkeypatch, tmp_path)
    assert again.setting == result.setting and calls2["confirm"] == 0
    assert [f.setting for f in again.confirmation.finalists] == [f.setting for f in conf.finalists]


def test_another_split_seed_is_another_run(monkeypatch, tmp_path):
    _fake_device(monkeypatch, efficiency=0.9)
    model, kw = make_model("vit", depth=4), dict(speedup=1.3, methods=["tome"], step=4, search=("merge",),
                                                 out_dir=str(tmp_path))

    def stop_at_first_timing(msg):
        if msg.startswith("timing"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_module.tune(model, _data(), progress=stop_at_first_timing, **kw)
    assert (tmp_path / "candidates.jsonl").stat().st_size > 0
    with pytest.raises(ValueError, match="confirm"):
        tune_module.tune(model, _data(), seed=1, **kw)


def test_confirmation_is_skipped_and_said_below_the_minimum():
    data = TensorDataset(images(40, seed=5), torch.arange(40) % 10)
    search, confirm, why = tune_module._split(data, 0.25, 0)
    assert search is data and confirm is None and "confirmation skipped: 10 of 40" in why
    search, confirm, why = tune_module._split(_data(), 0.25, 0)
    assert len(search) == 96 and len(confirm) == 32 and why is None
    assert not set(search.indices) & set(confirm.indices)


def test_bad_confirmation_options_are_refused():
    model = make_model("vit")
    for kw, match in [(dict(confirm=1.0), "confirm is the share"), (dict(finalists=0), "finalists"),
                      (dict(confirm_z=float("nan")), "confirm_z")]:
        with pytest.raises(ValueError, match=match):
            tune_module.tune(model, _data(8), speedup=1.3, **kw)
