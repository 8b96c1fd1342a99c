"""Run under torchrun by test_dist_search.py: a sweep, a tune or the timing turn on a tiny model.

    _dist_search_worker.py sweep OUT [KILL_AT]   rank 1 kills itself at its KILL_AT-th evaluation
    _dist_search_worker.py tune OUT
    _dist_search_worker.py timing OUT
Each rank writes OUT/rank<r>.json: what it returned and how many journal rows it appended.
"""
import json
import os
import signal
import sys
import time

import torch

import search_fixtures as fx
import tokenslim.measure.table as table
import tokenslim.sweep as sweep_module
import tokenslim.tune.record as record
import tokenslim.tune.scoring as scoring
from tokenslim.measure import compare, time_alone
from tokenslim.ranks import gather_rows, init_from_env, on_main, shard_indices

mode, out = sys.argv[1], sys.argv[2]
info = init_from_env()
appended = []
for module in (sweep_module, record):
    real = module.append_jsonl
    module.append_jsonl = lambda path, row, _real=real: appended.append(path) or _real(path, row)
table.compare = scoring.compare = fx.fake_compare
report = {"rank": info.rank}

if mode == "sweep":
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    calls = []
    real_evaluate = sweep_module.evaluate

    def evaluate(*a, **k):
        calls.append(1)
        if info.rank == 1 and len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_evaluate(*a, **k)

    sweep_module.evaluate = evaluate
    lines = []
    rows = sweep_module.run_sweep(fx.model(), fx.SETTINGS, fx.data(), eval_kwargs=dict(num_workers=0, batch_size=8,
                                  progress=False), bench_kwargs=dict(rounds=15), progress=lines.append,
                                  jsonl_path=os.path.join(out, "sweep.jsonl"))
    report.update(rows=fx.accuracy_columns(rows), lines=lines)
elif mode == "tune":
    from tokenslim.tune import tune

    result = tune(fx.model(), fx.data(160), speedup=1.3, methods=["tome"], step=4, search=("merge",),
                  out_dir=out, eval_batch_size=16, fresh=True)
    report.update(setting=result.setting, kls=[c.kl for c in result.candidates],
                  confirm=result.confirmation.chosen if result.confirmation else None,
                  phases=sorted(result.spent), files=sorted(result.files))
elif mode == "timing":
    try:
        compare({"a": fx.model(), "b": fx.model()}, rounds=15, batch_size=2, latency=False)
        report["refused"] = None
    except RuntimeError as e:
        report["refused"] = str(e)
    seen = {}

    def timing():
        seen["threads"] = torch.get_num_threads()
        time.sleep(1.0)
        return time.time()

    report["timing_ended"] = time_alone(timing)
    report["returned"] = time.time()
    report["threads_inside"] = seen.get("threads")
    report["threads_after"] = torch.get_num_threads()

    def refuse():
        raise ValueError("sweep.jsonl holds rows of another run")

    try:  # rank 0's error (a journal of another run, say) is raised on every rank: none is left waiting
        on_main(refuse)
    except ValueError as e:
        report["error"] = str(e)
    # 9 items in blocks of 2: rank 0 holds 0, 1, 4, 5, 8 and rank 1 holds 2, 3, 6, 7.
    own = torch.tensor([float(i) for i in shard_indices(9, info.rank, 2, 2)])
    report["gathered"] = gather_rows(own, 9, info, 2).tolist()
    # Fewer batches than ranks: rank 1's shard is empty, and reusing its (empty) reference outputs
    # still gives every rank the paired result.
    from tokenslim.evaluate import evaluate

    few = fx.data(5)
    kw = dict(batch_size=8, num_workers=0, progress=False)
    ref = evaluate(fx.model(), few, keep_logits=True, **kw).logits
    paired = evaluate(fx.model(), few, reference_logits=ref, **kw)
    report["empty_shard"] = [ref.shape[0], paired.agreement, paired.images]
report["appended"] = len(appended)
with open(os.path.join(out, f"rank{info.rank}.json"), "w") as f:
    json.dump(report, f)
torch.distributed.destroy_process_group()
