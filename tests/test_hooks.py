"""A patched model is still a PyTorch model: forward hooks and pre-hooks on blocks and their
attention fire once per forward under every reduction, on every adapter, and see the reduced tokens."""
from __future__ import annotations

import collections
import pickle

import pytest
import timm
import torch

import tokenslim
from conftest import images, make_model
from test_eva import make_eva


class Recorder:
    """Counts hook calls per kind and keeps the token count each block's forward hook saw."""

    def __init__(self, blocks, attention_of):
        self.calls = collections.Counter()
        self.block_tokens = []
        self.attn_tokens = []
        self.handles = []
        for block in blocks:
            attn = attention_of(block)
            self.handles += [
                block.register_forward_pre_hook(self._pre),
                block.register_forward_hook(self._block),
                attn.register_forward_pre_hook(self._attn_pre),
                attn.register_forward_hook(self._attn),
            ]

    @staticmethod
    def _first(value):
        return value[0] if isinstance(value, (tuple, list)) else value

    def _pre(self, module, args):
        self.calls["block_pre"] += 1

    def _block(self, module, args, out):
        self.calls["block"] += 1
        self.block_tokens.append(self._first(out).shape[1])

    def _attn_pre(self, module, args):
        self.calls["attn_pre"] += 1

    def _attn(self, module, args, out):
        self.calls["attn"] += 1
        self.attn_tokens.append(self._first(out).shape[1])

    def remove(self):
        for h in self.handles:
            h.remove()


TIMM_CASES = {
    "vit": lambda: make_model("vit"),
    "deit_distilled": lambda: make_model("deit_distilled"),
    "avg_no_class": lambda: make_model("avg_no_class"),
    "eva02": lambda: make_eva("eva02"),
    "rope_vit": lambda: make_eva("rope_vit"),
}
SETTINGS = {
    "merge": dict(r=4),
    "merge+prune": dict(r=2, keep_rate=0.7, prune_layers=(1,), fuse_pruned=True),
    "merge+channels": dict(r=3, mlp_pruned=0.25),
    "merge+masks": dict(r=3, mlp_pruned=0.25, heads_pruned=0.34, materialize=False),
    "method": dict(r=3, method="mlerp"),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("name", sorted(TIMM_CASES))
def test_timm_hooks_fire_once_per_forward_with_reduced_counts(name, setting):
    model = TIMM_CASES[name]()
    settings = SETTINGS[setting]
    if name == "eva02" and "mlp_pruned" in settings:
        settings = dict(settings, mlp_pruned=0.0)  # EVA-02's SwiGLU has a norm over its hidden channels
    if name in ("eva02", "rope_vit") and "heads_pruned" in settings:
        settings = dict(settings, heads_pruned=0.0)  # Eva heads are not pruned (rotary halves)
    if getattr(model, "cls_token", None) is None and "keep_rate" in settings:
        settings = dict(r=2, prune_layers=(1,), keep_rate=None)  # pruning ranks by the class token's attention
    tokenslim.patch(model, **settings)
    rec = Recorder(model.blocks, lambda b: b.attn)
    x = images(2)
    with torch.no_grad():
        model(x)
    depth = len(model.blocks)
    assert dict(rec.calls) == {"block_pre": depth, "block": depth, "attn_pre": depth, "attn": depth}
    # Block i's output holds the tokens entering block i + 1; attention sees the tokens entering block i.
    plan = tokenslim.token_plan(model, x.shape[-1])
    assert rec.attn_tokens == list(plan.tokens[:depth])
    assert rec.block_tokens == list(plan.tokens[1:depth + 1])
    assert rec.block_tokens[-1] < rec.attn_tokens[0]
    # forward_features and forward_intermediates call the blocks as modules too.
    rec.calls.clear()
    with torch.no_grad():
        model.forward_features(x)
        model.forward_intermediates(x, indices=1)
    assert rec.calls["block"] == 2 * depth and rec.calls["attn"] == 2 * depth
    rec.remove()


def test_hook_that_replaces_an_output_is_honoured():
    model = tokenslim.patch(make_model("vit"), r=4)
    last = model.blocks[-1]
    x = images(2)
    handle = last.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    with torch.no_grad():
        features = model.forward_features(x)
    handle.remove()
    expected = model.norm(torch.zeros(1, 1, features.shape[-1])).expand_as(features)
    torch.testing.assert_close(features, expected)
    # An attention hook that zeroes the attention branch leaves the block's residual alone.
    block = model.blocks[0]
    seen = {}
    block.attn.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    block.register_forward_pre_hook(lambda module, args: seen.__setitem__("in", args[0]))
    block.mlp.register_forward_pre_hook(lambda module, args: seen.__setitem__("mlp_in", args[0]))
    with torch.no_grad():
        model(x)
    assert seen["mlp_in"].shape[1] == seen["in"].shape[1] - 4  # reduced after the (zeroed) attention residual


def test_pre_hook_that_replaces_the_input_is_honoured():
    model = tokenslim.patch(make_model("vit"), r=4)
    x = images(2)
    with torch.no_grad():
        ref = model.forward_features(x)
        handle = model.blocks[1].register_forward_pre_hook(lambda module, args: (args[0] * 2,))
        doubled = model.forward_features(x)
    handle.remove()
    assert not torch.allclose(ref, doubled)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref)


def test_pre_hook_with_kwargs_sees_the_tokenslim_call():
    model = tokenslim.patch(make_model("vit"), r=4)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)),
                                              with_kwargs=True)
    with torch.no_grad():
        model(images(1))
    assert seen == [["tokenslim_call"]]


def test_r0_hooks_are_the_unpatched_ones_and_unpatch_restores_every_class():
    model = make_model("vit")
    classes = [(type(b), type(b.attn)) for b in model.blocks]
    tokenslim.patch(model, r=0)
    rec = Recorder(model.blocks, lambda b: b.attn)
    with torch.no_grad():
        model(images(2))
    assert rec.calls["block"] == len(model.blocks) and rec.attn_tokens == [65] * len(model.blocks)
    tokenslim.unpatch(model)
    assert [(type(b), type(b.attn)) for b in model.blocks] == classes
    eva = make_eva("rope_vit")
    classes = [(type(b), type(b.attn)) for b in eva.blocks]
    tokenslim.unpatch(tokenslim.patch(eva, r=2))
    assert [(type(b), type(b.attn)) for b in eva.blocks] == classes


def test_hooked_model_pickles_deepcopies_and_compiles():
    import copy

    model = tokenslim.patch(make_model("vit"), r=4)
    x = images(2)
    with torch.no_grad():
        ref = model(x)
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            torch.testing.assert_close(clone(x), ref)
            rec = Recorder(clone.blocks, lambda b: b.attn)
            clone(x)
            assert rec.calls["block"] == len(clone.blocks)


def test_gradient_checkpointing_runs_hooks_and_matches():
    model = tokenslim.patch(make_model("vit"), r=4).train()
    for p in model.parameters():
        p.requires_grad_(True)
    x = images(2)
    ref = model(x).sum()
    ref.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    rec = Recorder(model.blocks, lambda b: b.attn)
    out = model(x).sum()
    out.backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert rec.calls["block"] >= len(model.blocks)  # once in the forward (again when recomputed)


def test_block_replaced_after_patch_is_refused_naming_what_to_do():
    model = tokenslim.patch(make_model("vit"), r=4)
    fresh = make_model("vit", seed=3)
    model.blocks[1] = fresh.blocks[1]  # the same class, not wired by the patch
    with pytest.raises(TypeError, match="block 1 is now a new Block: it was replaced after tokenslim.patch.*again"):
        model(images(1))
    tokenslim.patch(model, r=4)  # wiring it again is the fix
    model(images(1))
    eva = tokenslim.patch(make_eva("rope_vit"), r=4)
    eva.blocks[2] = make_eva("rope_vit", seed=3).blocks[2]
    with pytest.raises(TypeError, match="block 2 is now a new EvaBlock"):
        eva(torch.randn(1, 3, 32, 32))



@pytest.mark.parametrize("setting", ["merge", "merge+prune"])
def test_transformers_hooks_fire(setting):
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from test_hf_vit import hf_models

    for name in ("ViTForImageClassification", "Dinov2Model", "CLIPVisionModel"):
        model = hf_models()[name]().eval()
        tokenslim.patch(model, **SETTINGS[setting])
        base = next(m for m in model.modules() if hasattr(m, "tokenslim_layers"))
        layers = base.tokenslim_layers
        attention_of = (lambda b: b.self_attn) if name.startswith("CLIP") else (lambda b: b.attention)
        rec = Recorder(layers, attention_of)
        with torch.no_grad():
            model(pixel_values=torch.randn(2, 3, 32, 32))
        depth = len(layers)
        assert dict(rec.calls) == {"block_pre": depth, "block": depth, "attn_pre": depth, "attn": depth}, name
        assert rec.block_tokens[-1] < rec.attn_tokens[0], name
        tokenslim.unpatch(model)
        assert not any(type(m).__name__.startswith("TokenSlim") for m in model.modules()), name


@pytest.mark.parametrize("setting", ["merge", "merge+prune"])
def test_open_clip_hooks_fire(setting):
    pytest.importorskip("open_clip", reason="the open_clip extra is not installed")
    from test_open_clip_vit import _clip, _images

    model = _clip()
    tokenslim.patch(model, **SETTINGS[setting])
    blocks = model.visual.transformer.resblocks
    rec = Recorder(blocks, lambda b: b.attn)
    with torch.no_grad():
        model.encode_image(_images(2))
    depth = len(blocks)
    assert dict(rec.calls) == {"block_pre": depth, "block": depth, "attn_pre": depth, "attn": depth}
    assert rec.block_tokens[-1] < rec.attn_tokens[0]
    tokenslim.unpatch(model)
    assert not any(type(m).__name__.startswith("TokenSlim") for m in model.modules())
