"""Shared by test_dist_search.py and the torchrun worker it starts: a tiny model, images with
labels, and a deterministic stand-in for the timer (speed is benchmarked, never asserted)."""
import torch
from torch.utils.data import TensorDataset

from conftest import images, make_model
from tokenslim.measure.benchmark import Comparison, RatioEstimate, _context
from tokenslim.measure.macs import count_macs

SETTINGS = ["r=2", "r=4", "r=(6,-1)"]


def model():
    return make_model("vit", depth=4)


def data(n=67):  # odd: the two ranks' shards differ in size
    return TensorDataset(images(n, seed=5), torch.arange(n) % 10)


def fake_compare(models, baseline="none", **kw):
    """A device whose speed-up is 0.8 x the MAC ratio. It builds the run context as the real timer
    does, so it is refused where the real one would be (a timing under torchrun outside its turn)."""
    first = next(iter(models.values()))
    ctx = _context(first, None, "float32", kw.get("batch_size", 32), kw.get("img_size"), False, False)
    base = count_macs(models[baseline]).gmacs
    out = {}
    for name, m in models.items():
        ratio = base / count_macs(m).gmacs * (0.8 if name != baseline else 1.0)
        out[name] = RatioEstimate(ratio, ratio * 0.98, ratio * 1.02, 0.95, 15)
    return Comparison(baseline, out, dict(out) if kw.get("latency", True) else {},
                      {n: 1.0 for n in models}, {n: 1.0 for n in models}, ctx)


ACCURACY = ("setting", "images", "top1", "top5", "correct1", "correct5", "loss", "agreement", "kl", "reference_top1",
            "top1_diff", "top1_diff_se")


def accuracy_columns(rows):
    return [{k: r.get(k) for k in ACCURACY} for r in rows]
