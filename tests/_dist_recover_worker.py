"""Run under torchrun by test_recover_scale.py: a recovery on tiny data, one share per rank.

argv: OUT_DIR STEPS STOP_AFTER (0: never) MIXUP
Writes OUT_DIR/params.pt (rank 0) and OUT_DIR/saved_rank<r> for every rank that wrote a state.
"""
import os
import sys

import torch

import tokenslim
import tokenslim.recover.trainer as trainer_module
from recover_fixtures import data, student_and_teacher
from tokenslim.evaluate import init_from_env
from tokenslim.recover import recover

out, steps, stop_after, mixup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
info = init_from_env()
real_save = torch.save


def marking_save(obj, path, *a, **k):
    if str(path).endswith(".state.tmp"):
        open(os.path.join(out, f"saved_rank{info.rank}"), "w").close()
    return real_save(obj, path, *a, **k)


trainer_module.torch.save = marking_save
if stop_after:
    real_step = trainer_module.Trainer._step

    def stopping(self, *a, **k):
        if self.step == stop_after:
            raise SystemExit(7)  # killed mid-run, after the state of step `stop_after` was written
        return real_step(self, *a, **k)

    trainer_module.Trainer._step = stopping
model, teacher = student_and_teacher()
result = recover(model, teacher, data(), steps=steps, batch_size=8, save_every=2, mixup=mixup,
                 state_path=os.path.join(out, "run.state"), progress=False, device="cpu")
if info.rank == 0:
    torch.save({"state_dict": model.state_dict(), "losses": result.losses, "world_size": result.world_size},
               os.path.join(out, "params.pt"))
torch.distributed.destroy_process_group()
