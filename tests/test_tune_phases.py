"""Each phase of tune's search on its own (tokenslim.tune.search.Search), on a planted model with
the deterministic stand-in timer of test_tune."""
import time

import torch

import tokenslim.tune.scoring as tune_scoring
import tokenslim.tune.search as tune_search
from conftest import make_model
from test_tune import _data, _fake_device
from tokenslim.measure.macs import count_macs
from tokenslim.spec import apply_setting, parse_setting
from tokenslim.tune.record import Journal
from tokenslim.tune.space import Point, moves, plain, shift


def _planted(depth=6):
    """The last two blocks barely change the output: reduction there costs almost nothing."""
    model = make_model("vit", depth=depth)
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # sharp outputs: KL differences well above rounding
        for block in model.blocks[depth - 2:]:
            for p in block.parameters():
                p.mul_(1e-3)
    return model


def _search(model, speedup=1.3, budget_s=600.0, search=("merge",), prune_ok=False, step=4, journal=None):
    aim = speedup * 1.03 if speedup else None
    return tune_search.Search(model, _data(), journal or Journal(None, {}, False), speedup, None, aim, search,
                              prune_ok, step, time.perf_counter() + budget_s,
                              timing=dict(batch_size=4, img_size=None, rounds=15, device="cpu", precision="float32"),
                              eval_kw=dict(batch_size=16, num_workers=0, device="cpu", progress=False),
                              say=lambda msg: None)


def test_space_moves_and_shifts():
    p = Point((2, 0, 0), (0, 0, 0))
    keys = [k for k, _ in moves(p, ("merge", "prune", "mlp"), True, 2)]
    assert keys == [("merge", 0), ("merge", 1), ("merge", 2), ("prune", 0), ("prune", 1), ("prune", 2), ("mlp",)]
    assert shift(p, 0, 2, 2) == Point((0, 0, 2), (0, 0, 0)) and shift(p, 1, 2, 2) is None
    assert plain("ramp", 4, 3, (0, 0, 0), 0.0).r == (8, 4, 0)
    assert Point((1, 0), (0, 4), 0.25).text("diffrate") == \
        "r=[1,0],keep_rate=[0.01],prune_layers=(1,),mlp_pruned=0.25,method=diffrate"


def test_greedy_phase_spends_reduction_where_it_costs_least(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    s = _search(_planted())
    point, cand = s.greedy("tome", "", Point.origin(6), 1.15, None)
    assert cand.mac_ratio >= 1.15
    assert sum(point.r[:3]) <= sum(point.r[3:]), point.r


def test_refine_phase_only_takes_moves_that_lower_the_kl_at_equal_compute(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    s = _search(_planted())
    start = Point((0, 0, 0, 4, 4, 4), (0,) * 6)
    first = s.assess(start.text("tome"), "tome", "test")
    point, cand = s.refine("tome", "", start, first)
    tried = [c for c in s.candidates if c.phase == "refine"]
    assert len(tried) >= 5 * 3  # every move out of the three merging blocks was tried
    assert cand.gmacs <= first.gmacs * tune_search.SIMILAR_MACS
    if point != start:
        assert cand.kl < first.kl - 1e-6
    better = [c for c in tried if c.gmacs <= first.gmacs * tune_search.SIMILAR_MACS and c.kl < first.kl - 1e-6]
    assert (point != start) == bool(better)  # it moves exactly when a better equal-compute move exists


def test_challenge_phase_replaces_the_point_only_with_a_better_plain_schedule(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    s = _search(_planted())
    start = Point((0, 0, 0, 0, 12, 12), (0,) * 6)  # the cheap late blocks: hard for plain schedules to beat
    first = s.assess(start.text("tome"), "tome", "test")
    point, cand = s.challenge("tome", "", start, first)
    tried = {c.setting for c in s.candidates if c.phase == "challenge"}
    # Exactly the weakest member of each family at this compute is evaluated, found by counting MACs.
    expected = set()
    for family in ("constant", "ramp"):
        for k in range(1, 65):
            text = plain(family, k, 6, (0,) * 6, 0.0).text("tome")
            if count_macs(apply_setting(make_model("vit", depth=6), parse_setting(text))).gmacs <= \
                    first.gmacs * tune_search.SIMILAR_MACS:
                expected.add(text)
                break
    assert tried == expected and len(expected) == 2
    assert cand is first and point == start  # no plain schedule at this compute has a lower KL here
    s2 = _search(_planted())
    bad = Point((12, 12, 0, 0, 0, 0), (0,) * 6)
    first = s2.assess(bad.text("tome"), "tome", "test")
    point, cand = s2.challenge("tome", "", bad, first)
    assert cand.kl <= first.kl and cand.gmacs <= first.gmacs * tune_search.SIMILAR_MACS
    assert (cand is first) == (point == bad)


def test_contest_phase_keeps_the_lowest_kl_that_reaches_the_aim(monkeypatch):
    _fake_device(monkeypatch, efficiency=0.9)
    s = _search(make_model("vit", depth=6), speedup=1.2)
    point = Point((6, 6, 6, 6, 6, 6), (0,) * 6)
    cand = s.assess(point.text("tome"), "tome", "test")
    assert s.measure(cand) >= s.aim  # the contest starts from a point that reaches the aim
    best = s.contest("tome", "", point, cand)
    timed = [c for c in s.candidates if (c.throughput_ratio or 0) >= s.aim]
    assert best.throughput_ratio >= s.aim and best.kl <= min(c.kl for c in timed) + 1e-12


def test_measure_times_once_through_the_journal(monkeypatch, tmp_path):
    _fake_device(monkeypatch, efficiency=1.0)
    calls = []
    real = tune_scoring.compare
    monkeypatch.setattr(tune_scoring, "compare", lambda *a, **k: calls.append(1) or real(*a, **k))
    s = _search(make_model("vit", depth=4), journal=Journal(str(tmp_path / "j.jsonl"), {}, False))
    cand = s.assess(Point((4, 0, 0, 0), (0,) * 4).text("tome"), "tome", "test")
    first = s.measure(cand)
    assert s.measure(cand) == first and len(calls) == 1
    s.measure(cand, again=True)
    assert len(calls) == 2  # an independent re-measurement is a new timing


def test_reach_speed_phase_stops_on_the_budget(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    s = _search(make_model("vit", depth=6), speedup=1.5, budget_s=0.0)
    assert s.reach_speed("tome", "") is None  # no time: no unfinished point is passed off as a result


def test_screening_promotes_the_best_options_of_the_subset(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    s = _search(_planted(), search=("merge", "prune"), prune_ok=True)
    s2 = tune_search.Search.__new__(tune_search.Search)  # the same search, screening on 8 of 16 images
    s2.__dict__.update(s.__dict__)
    from torch.utils.data import Subset

    s2.screen, s2.promote = 8, 3
    s2.screen_data, s2.screen_logits = Subset(s.data, list(range(8))), s.ref_logits[:8]
    options = moves(Point.origin(6), ("merge", "prune"), True, 4)
    promoted = [(key, trial) for _, key, trial in s2.screen_ranked("tome", "", options, None)[:s2.promote]]
    assert len(promoted) == 3
    # The promoted ones are exactly the three of lowest cost per MAC on the subset, computed by hand.
    by_hand = []
    for key, trial in options:
        row = s2.assess_screen(trial.text("tome"), "tome")
        saved = s.base_gmacs - row["gmacs"]
        by_hand.append(((row["kl"] / saved if row["kl"] > tune_search.FREE_KL else 0.0, -saved), key))
    assert [k for k, _ in promoted] == [k for _, k in sorted(by_hand)[:3]]
    # Screened evaluations are journalled apart from full ones.
    assert all("@screen8" in k for k in s2.journal.evals)


def test_incumbent_is_plain_tome_reaching_the_aim_when_timed(monkeypatch):
    _fake_device(monkeypatch, efficiency=0.8)
    s = _search(make_model("vit", depth=6), speedup=1.3)
    held = s.incumbent("tome", "")
    assert held.throughput_ratio >= s.aim and held.phase == "incumbent"
    r = held.setting
    assert r.startswith("r=[") and "keep_rate" not in r and "method" not in r


def test_a_missed_timing_jumps_to_the_strength_its_efficiency_predicts(monkeypatch):
    # Efficiency 0.6: the member with the aim's MAC ratio misses by far. The next timing goes to the
    # weakest member predicted to reach the aim, then down one at a time: few timings, same answer.
    _fake_device(monkeypatch, efficiency=0.6)
    s = _search(make_model("vit", depth=6), speedup=1.3, step=1)
    timed = []
    real = s.measure
    monkeypatch.setattr(s, "measure", lambda cand, again=False: timed.append(cand.setting) or real(cand, again))
    held = s.incumbent("tome", "")
    assert held.throughput_ratio >= s.aim
    per_family = {}
    for text in timed:
        family = "constant" if len(set(parse_setting(text)["r"])) == 1 else "ramp"
        per_family.setdefault(family, []).append(text)
    for family, texts in per_family.items():
        assert len(texts) <= 3, (family, texts)
    strengths = [parse_setting(t)["r"][0] for t in per_family["constant"]]  # the family timed first
    assert strengths[1] - strengths[0] > 1, strengths  # a jump, not one strength at a time
    # The ramp starts where the constant family's efficiency says: its first timing reaches the aim.
    assert s.journal.timings[per_family["ramp"][0]]["throughput_ratio"] >= s.aim
    # The same weakest member as timing one strength at a time would find.
    for family in per_family:
        k = next(k for k in range(1, 64) if s.journal.timings.get(plain(family, k, 6, (0,) * 6, 0.0).text("tome", ""),
                                                                     {}).get("throughput_ratio", 0) >= s.aim)
        weaker = plain(family, k - 1, 6, (0,) * 6, 0.0).text("tome", "")
        assert s.journal.timings[weaker]["throughput_ratio"] < s.aim


def test_a_budget_stop_returns_the_incumbent_not_an_unfinished_point(monkeypatch):
    import tokenslim.tune as tune_module

    _fake_device(monkeypatch, efficiency=0.8)

    def stopped(self, method, extra, held=None):  # the budget ran out mid-walk: an untimed, unfinished point
        return self.assess(Point((2,) * 6, (0,) * 6).text(method, extra), method, "greedy")

    monkeypatch.setattr(tune_search.Search, "reach_speed", stopped)
    result = tune_module.tune(make_model("vit", depth=6), _data(), speedup=1.3, methods=["tome"], step=4,
                              search=("merge",))
    assert result.best.phase == "incumbent" and result.reached


def test_an_unreachable_target_is_a_clear_miss(monkeypatch):
    import tokenslim.tune as tune_module

    _fake_device(monkeypatch, efficiency=0.05)  # a device on which reduction barely pays
    result = tune_module.tune(make_model("vit", depth=4), _data(), speedup=3.0, methods=["tome"], step=4,
                              search=("merge",), budget_min=10)
    assert result.reached is False and result.best.throughput_ratio < 3.0


def _screened(s, screen=8, promote=3):
    """The same search with screening on ``screen`` of its 16 images (the deep-model mode)."""
    from torch.utils.data import Subset

    s2 = tune_search.Search.__new__(tune_search.Search)
    s2.__dict__.update(s.__dict__)
    s2.screen, s2.promote = screen, promote
    s2.screen_data, s2.screen_logits = Subset(s.data, list(range(screen))), s.ref_logits[:screen]
    return s2


def test_screened_walk_steps_coarsely_far_from_the_goal_and_finely_near_it(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    s = _screened(_search(_planted(), step=2))
    base = s.base_gmacs
    assert s.coarse(3.0, base * 0.6) and not s.coarse(3.0, base * 0.5) and not s.coarse(None, base)
    point, cand = s.greedy("tome", "", Point.origin(6), 1.02, None)  # one step, from far away
    assert sum(point.r) == 4  # twice the merge step
    assert not s.coarse(cand.mac_ratio * 1.001, cand.gmacs)
    point2, _ = s.greedy("tome", "", point, cand.mac_ratio * 1.001, cand)  # near the goal: one fine step
    assert sum(point2.r) - sum(point.r) == 2


def test_screened_walk_repeats_the_best_step_without_screening_again(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    model = make_model("vit", depth=6)
    with torch.no_grad():  # the last block now changes nothing: reduction there is exactly free
        model.head.weight.mul_(30.0)
        for p in model.blocks[-1].parameters():
            p.zero_()
    s = _screened(_search(model, step=2, search=("merge", "prune"), prune_ok=True))
    rounds, lines = [], []
    real = tune_search.Search.screen_ranked
    monkeypatch.setattr(tune_search.Search, "screen_ranked", lambda self, *a: rounds.append(1) or real(self, *a))
    s.say = lines.append
    s.greedy("tome", "", Point.origin(6), 1.25, None)
    steps = [line for line in lines if line.startswith("tome: r=")]
    again = [line for line in steps if line.endswith("(the same step, still the best)")]
    assert again and len(rounds) == len(steps) - len(again)  # a repeated free step screens nothing
    for line in again:
        assert "KL 0.0000" in line


def test_screened_refine_takes_only_a_better_move_at_equal_compute(monkeypatch):
    _fake_device(monkeypatch, efficiency=1.0)
    s = _screened(_search(_planted()))
    start = Point((4, 4, 4, 0, 0, 0), (0,) * 6)  # merges where they cost most
    first = s.assess(start.text("tome"), "tome", "test")
    lines = []
    s.say = lines.append
    point, cand = s.refine("tome", "", start, first)
    full = [c for c in s.candidates if c.phase == "refine"]
    assert full and cand.kl < first.kl and cand.gmacs <= first.gmacs * tune_search.SIMILAR_MACS
    assert point != start
    # Each round (one per move taken, and the last that found none) evaluates at most `promote`
    # moves on all images, each moving merges without adding any.
    rounds = 1 + sum(1 for line in lines if line.startswith("tome: refined to"))
    assert len(full) <= s.promote * rounds
    for c in full:
        r = [int(x) for x in c.setting[3:c.setting.index("]")].split(",")]
        assert sum(r) == sum(start.r)


def test_a_deep_walk_starts_from_the_incumbent_scaled_down(monkeypatch):
    _fake_device(monkeypatch, efficiency=0.8)
    s = _screened(_search(make_model("vit", depth=6), speedup=1.3, search=("merge", "prune"), prune_ok=True,
                          step=2))
    held = s.incumbent("tome", "")
    point, cand, goal = s.warm_start("tome", "", held)
    assert point.r == tuple(int(round(x * tune_search.WARM_SHARE)) for x in s.incumbent_point.r)
    assert cand.phase == "warm start" and cand.mac_ratio < held.mac_ratio
    assert goal == s.aim / (held.throughput_ratio / held.mac_ratio)
    best = s.reach_speed("tome", "", held)
    assert best.throughput_ratio >= s.aim
    assert [c.phase for c in s.candidates].index("warm start") < [c.phase for c in s.candidates].index("greedy")
