"""Recovery at scale: torchrun ranks equal one process at the same global batch, rank 0 alone
writes, a killed run resumes on any number of ranks, epochs, validation, streams, early refusals."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import IterableDataset

import tokenslim.recover.trainer as trainer_module
from recover_fixtures import data, student_and_teacher
from tokenslim.recover import recover

HERE = Path(__file__).parent


def _torchrun(out, steps, stop_after=0, mixup=0.0, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    return subprocess.run([str(torchrun), "--standalone", f"--nproc_per_node={nproc}",
                           str(HERE / "_dist_recover_worker.py"), str(out), str(steps), str(stop_after), str(mixup)],
                          env=env, capture_output=True, text=True, timeout=300)


def _single(steps, mixup=0.0, **kw):
    model, teacher = student_and_teacher()
    result = recover(model, teacher, data(), steps=steps, batch_size=8, save_every=2, mixup=mixup, progress=False,
                     device="cpu", **kw)
    return model, result


def _assert_same(a, b):
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("mixup", [0.0, 1.0])
def test_two_ranks_equal_one_process_and_only_rank_0_writes(tmp_path, mixup):
    proc = _torchrun(tmp_path, steps=6, mixup=mixup)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist = torch.load(tmp_path / "params.pt", weights_only=False)
    single, result = _single(6, mixup=mixup)
    assert dist["world_size"] == 2
    _assert_same(single.state_dict(), dist["state_dict"])
    assert dist["losses"] == pytest.approx(result.losses, abs=1e-5)
    assert sorted(p.name for p in tmp_path.glob("saved_rank*")) == ["saved_rank0"]
    assert "recover: 2 ranks train bias_norm, global batch 8 (4 per rank x 2 ranks)" in proc.stderr


@pytest.mark.slow
def test_killed_run_resumes_on_another_number_of_ranks(tmp_path):
    killed = _torchrun(tmp_path, steps=8, stop_after=4)
    assert killed.returncode != 0  # the run stopped after step 4's state was written
    assert torch.load(tmp_path / "run.state", weights_only=False)["step"] == 4
    # Resume the 2-rank state in one process: the same global batch, the same run.
    model, teacher = student_and_teacher()
    logs = []
    recover(model, teacher, data(), steps=8, batch_size=8, save_every=2, state_path=str(tmp_path / "run.state"),
            progress=False, device="cpu", log=logs.append)
    assert any("at step 4/8 (written by 2 ranks)" in m for m in logs)
    whole, _ = _single(8)
    _assert_same(whole.state_dict(), model.state_dict())


def test_epochs_count_global_batches_and_a_partial_batch_is_dropped():
    model, teacher = student_and_teacher()
    result = recover(model, teacher, data(36), epochs=2, batch_size=8, progress=False, device="cpu")
    assert result.steps == 8 and result.epochs == 2 and result.images == 36  # 36 // 8 = 4 steps per epoch
    with pytest.raises(ValueError, match="steps or epochs, not both"):
        recover(model, teacher, data(), steps=5, epochs=1, batch_size=8, progress=False)


def test_validation_keeps_the_best_epoch(monkeypatch):
    scripted = iter([70.0, 75.0, 72.0])  # epoch 2 is the best
    snapshots = []

    def fake_evaluate(model, val, reference=None, **kw):
        from tokenslim.evaluate.accuracy import EvalResult

        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        top1 = next(scripted)
        return EvalResult(images=len(val), top1=top1, top5=top1, correct1=0, correct5=0, loss=0.0, seconds=0.0,
                          world_size=1, device="cpu", precision="float32", settings={}, versions={},
                          agreement=top1, kl=1.0 / top1)

    import tokenslim.evaluate as ev

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    model, teacher = student_and_teacher()
    logs = []
    result = recover(model, teacher, data(), epochs=3, batch_size=8, progress=False, device="cpu",
                     val_data=data(10), log=logs.append)
    assert [v["epoch"] for v in result.val_history] == [1, 2, 3] and result.best["epoch"] == 2
    kept = {n: p for n, p in model.named_parameters()}
    for name, value in snapshots[1].items():
        torch.testing.assert_close(kept[name], value)  # the parameters after epoch 2, folded back
    assert any("kept the best validated parameters" in m for m in logs)


class _Stream(IterableDataset):
    def __init__(self, n=24):
        self.items = data(n)

    def __iter__(self):
        return iter(self.items[i] for i in range(len(self.items)))


def test_a_stream_trains_and_resumes(tmp_path):
    model, teacher = student_and_teacher()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    result = recover(model, teacher, _Stream(), steps=5, batch_size=8, save_every=2, progress=False, device="cpu",
                     state_path=str(tmp_path / "s.state"))
    assert result.steps == 5 and result.images is None
    assert any(not torch.equal(before[n], p) for n, p in model.state_dict().items())
    # The same run, interrupted after step 2 and resumed, ends where the uninterrupted one did.
    part, teacher2 = student_and_teacher()
    real_step = trainer_module.Trainer._step
    calls = {"n": 0}

    def stop_at_three(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    trainer_module.Trainer._step = stop_at_three
    try:
        with pytest.raises(KeyboardInterrupt):
            recover(part, teacher2, _Stream(), steps=5, batch_size=8, save_every=2, progress=False, device="cpu",
                    state_path=str(tmp_path / "p.state"))
    finally:
        trainer_module.Trainer._step = real_step
    resumed, teacher3 = student_and_teacher()
    recover(resumed, teacher3, _Stream(), steps=5, batch_size=8, save_every=2, progress=False, device="cpu",
            state_path=str(tmp_path / "p.state"))
    _assert_same(model.state_dict(), resumed.state_dict())


def test_refusals_before_any_training():
    model, teacher = student_and_teacher()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        recover(model, teacher, data(6), steps=2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="does not split evenly"):
        recover(model, teacher, data(), steps=2, batch_size=8, accum=3, progress=False)
    other = student_and_teacher()[1]
    other.reset_classifier(5)
    with pytest.raises(ValueError, match="same classes"):
        recover(model, other, data(), steps=2, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="precision"):
        recover(model, teacher, data(), steps=2, batch_size=8, precision="bfloat16", progress=False)


def test_accumulation_and_bf16_autocast_train():
    accumulated, _ = _single(4, accum=2)
    whole, _ = _single(4)
    _assert_same(whole.state_dict(), accumulated.state_dict())  # two half-batches make the same step
    amp, result = _single(3, precision="amp_bfloat16")
    assert result.steps == 3 and all(torch.isfinite(p).all() for p in amp.parameters())


class _CountingTeacher(torch.nn.Module):
    """The teacher, counting the images it is asked about."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.inner(x)


def test_cached_teacher_trains_as_the_uncached_run_and_asks_each_image_once():
    plain, teacher = student_and_teacher()
    recover(plain, teacher, data(), epochs=3, batch_size=8, hflip=True, progress=False, device="cpu")
    cached, teacher2 = student_and_teacher()
    counting = _CountingTeacher(teacher2)
    logs = []
    recover(cached, counting, data(), epochs=3, batch_size=8, hflip=True, cache_teacher=True, progress=False,
            device="cpu", log=logs.append)
    _assert_same(plain.state_dict(), cached.state_dict())
    # 32 images x 3 epochs (96 without the cache), each flipped or not: at most 64 (image, flip)
    # pairs, plus the one-image shape probe.
    assert counting.seen <= 2 * 32 + 1
    assert any("outputs are cached (32 images x 2 flips x 10 classes" in m for m in logs)


def test_flips_are_seeded_per_epoch_and_mirror_the_image():
    from tokenslim.recover.teacher_cache import apply_flips, flip_draws

    a, b = flip_draws(1000, 0, 0), flip_draws(1000, 0, 1)
    assert torch.equal(a, flip_draws(1000, 0, 0)) and not torch.equal(a, b)
    assert 400 < int(a.sum()) < 600
    x = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).view(2, 3, 2, 4)
    out = apply_flips(x, torch.tensor([True, False]))
    assert torch.equal(out[0], x[0, :, :, [3, 2, 1, 0]]) and torch.equal(out[1], x[1])


def test_hflip_changes_training_and_the_resume_check_sees_it(tmp_path):
    plain, _ = _single(4)
    flipped, _ = _single(4, hflip=True)
    assert any(not torch.equal(v, flipped.state_dict()[k]) for k, v in plain.state_dict().items())
    state = str(tmp_path / "r.state")
    _single(2, state_path=state)
    with pytest.raises(ValueError, match="hflip"):
        model, teacher = student_and_teacher()
        recover(model, teacher, data(), steps=2, batch_size=8, save_every=2, hflip=True, state_path=state,
                progress=False, device="cpu")


def test_teacher_cache_refusals():
    model, teacher = student_and_teacher()
    with pytest.raises(ValueError, match="mixup blends new images"):
        recover(model, teacher, data(), steps=2, batch_size=8, cache_teacher=True, mixup=1.0, progress=False)
    with pytest.raises(ValueError, match="map-style data set"):
        recover(model, teacher, _Stream(), steps=2, batch_size=8, cache_teacher=True, progress=False)
