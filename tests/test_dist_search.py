"""sweep and tune under torchrun (2 gloo ranks, tiny models, a deterministic stand-in for the
timer): the same results as one process, rank 0 alone writes, a timing is taken alone, a killed
rank ends the job and the rerun resumes, on another number of ranks too."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import search_fixtures as fx
import tokenslim.measure.table as table
import tokenslim.tune.scoring as scoring
from tokenslim.sweep import run_sweep
from tokenslim.tune import tune

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _torchrun(mode, out, *extra, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(HERE / "_dist_search_worker.py"),
                           mode, str(out), *map(str, extra)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.perf_counter() - start


def _report(out, rank):
    return json.loads((out / f"rank{rank}.json").read_text())


def _sweep(path, settings=fx.SETTINGS):
    return run_sweep(fx.model(), settings, fx.data(), eval_kwargs=dict(num_workers=0, batch_size=8, progress=False),
                     bench_kwargs=dict(rounds=15), jsonl_path=str(path))


@pytest.mark.slow
def test_sweep_on_two_ranks_resumes_a_one_rank_run_and_a_killed_rank_and_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(table, "compare", fx.fake_compare)
    single = _sweep(tmp_path / "single" / "sweep.jsonl")
    out = tmp_path / "dist"
    _sweep(out / "sweep.jsonl", fx.SETTINGS[:1])  # one process does none and the first setting

    # Rank 1 dies at its third evaluation: the unpatched outputs, the second setting, then the third.
    proc, seconds = _torchrun("sweep", out, 3)
    assert proc.returncode != 0 and seconds < 120, proc.stderr[-3000:]
    assert "rank" in proc.stderr and "1 (local_rank: 1)" in proc.stderr, proc.stderr[-3000:]
    kept = [json.loads(line)["setting"] for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert kept == ["none", fx.SETTINGS[0], fx.SETTINGS[1]]  # the second setting finished before the kill

    proc, _ = _torchrun("sweep", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [_report(out, r) for r in (0, 1)]
    assert ranks[0]["rows"] == ranks[1]["rows"] == fx.accuracy_columns(single)  # bit for bit
    assert ranks[0]["appended"] == 1 and ranks[1]["appended"] == 0  # only the last setting, by rank 0 only
    assert ranks[1]["lines"] == [] and any("evaluated on 1 rank(s), this run on 2" in m for m in ranks[0]["lines"])
    lines = (out / "sweep.jsonl").read_text().splitlines()
    assert [json.loads(line)["setting"] for line in lines] == ["none"] + fx.SETTINGS


@pytest.mark.slow
def test_tune_on_two_ranks_equals_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "compare", fx.fake_compare)
    single = tune(fx.model(), fx.data(160), speedup=1.3, methods=["tome"], step=4, search=("merge",),
                  out_dir=str(tmp_path / "single"), eval_batch_size=16)
    proc, _ = _torchrun("tune", tmp_path / "dist")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [_report(tmp_path / "dist", r) for r in (0, 1)]
    for r in ranks:
        assert r["setting"] == single.setting and r["kls"] == [c.kl for c in single.candidates]
        assert r["confirm"] == single.confirmation.chosen
        assert set(r["phases"]) == set(single.spent) and {"calibration", "timing", "confirm"} <= set(r["phases"])
    assert ranks[0]["files"] and ranks[1]["files"] == []
    assert ranks[0]["appended"] > 0 and ranks[1]["appended"] == 0
    journal = (tmp_path / "dist" / "candidates.jsonl").read_text().splitlines()
    assert len(journal) == ranks[0]["appended"]  # one row per record, none written twice


@pytest.mark.slow
def test_a_timing_under_torchrun_is_taken_alone_or_refused_and_rank_0_decides_for_all(tmp_path):
    (tmp_path / "t").mkdir()
    proc, _ = _torchrun("timing", tmp_path / "t")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [_report(tmp_path / "t", r) for r in (0, 1)]
    for r in ranks:  # the timer called directly, outside the turn, refuses on every rank
        assert r["refused"] and "time_alone" in r["refused"] and "torchrun" in r["refused"]
    # Rank 1 waited: it went on only after rank 0's timing had ended.
    assert ranks[1]["returned"] >= ranks[0]["timing_ended"] == ranks[1]["timing_ended"]
    cores = len(os.sched_getaffinity(0))
    assert ranks[0]["threads_inside"] == min(2, cores) and ranks[0]["threads_after"] == 1
    assert ranks[1]["threads_inside"] is None  # it computed nothing during the timing
    assert ranks[0]["error"] == ranks[1]["error"] == "sweep.jsonl holds rows of another run"
    assert ranks[0]["gathered"] == ranks[1]["gathered"] == list(range(9))  # back in the items' order
    assert ranks[0]["empty_shard"] == [5, 100.0, 5] and ranks[1]["empty_shard"] == [0, 100.0, 5]


def test_a_timing_in_one_process_is_not_refused(monkeypatch):
    from tokenslim.measure import check_alone

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_alone()
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched by torchrun, the group not joined yet: refused
    with pytest.raises(RuntimeError, match="time_alone"):
        check_alone()
