"""The patched model behaves like a timm model: lifecycle, serialisation, timm entry points."""
import copy
import io
import threading

import pytest
import timm
import torch

import tokenslim
from conftest import images, make_model


def test_unpatch_restores_exactly():
    model = make_model("deit3_layerscale")
    cls = type(model)
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        tokenslim.patch(model, r=8)
        assert tokenslim.is_patched(model)
        assert not torch.allclose(model(x), expected)
        tokenslim.unpatch(model)
        assert type(model) is cls and not hasattr(model, "tokenslim")
        assert torch.equal(model(x), expected)
    assert tokenslim.unpatch(model) is model  # unpatching twice is harmless


def test_double_patch_does_not_stack_and_r_changes_at_runtime():
    model = make_model("vit")
    x = images(2)
    with torch.no_grad():
        tokenslim.patch(model, r=4)
        at4 = model(x)
        tokenslim.patch(model, r=8)
        tokenslim.patch(model, r=4)
        from timm.models.vision_transformer import VisionTransformer
        from tokenslim.adapters.timm_vit import TokenSlimVisionTransformer

        # Patching three times leaves one level of patch class over timm's class.
        assert type(model) is TokenSlimVisionTransformer
        assert TokenSlimVisionTransformer.__bases__[-1] is VisionTransformer
        assert torch.equal(model(x), at4)
        model.tokenslim.r = 0
        plain = model(x)
        tokenslim.unpatch(model)
        assert torch.equal(model(x), plain)


def test_settings_validate_on_assignment():
    model = tokenslim.patch(make_model("vit"), r=2)
    with pytest.raises(ValueError):
        model.tokenslim.r = -1
    with pytest.raises(ValueError):
        model.tokenslim.r = [1] * 5  # 4 blocks
    with pytest.raises(TypeError):
        model.tokenslim.r = "8"
    with pytest.raises(TypeError):
        model.tokenslim.prop_attn = 1
    assert model.tokenslim.r == 2  # a refused value leaves the old one in place
    assert model.tokenslim.as_dict() == {"r": 2, "keep_rate": None, "prune_layers": [3, 6, 9],
                                         "fuse_pruned": False, "prop_attn": None, "depth": 4,
                                         "method": "tome", "threshold": None, "margin": None}
    assert model.tokenslim.uses_prop_attn


def test_state_dict_deepcopy_save_load():
    model = make_model("dinov2_registers")
    keys = list(model.state_dict())
    tokenslim.patch(model, r=6)
    assert list(model.state_dict()) == keys
    x = images(2)
    with torch.no_grad():
        expected = model(x)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), expected)
        twin.tokenslim.r = 0
        assert model.tokenslim.r == 6  # the copy's settings are its own
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert tokenslim.is_patched(loaded) and torch.equal(loaded(x), expected)
        fresh = tokenslim.patch(make_model("dinov2_registers", seed=5), r=6)
        fresh.load_state_dict(make_model("dinov2_registers").state_dict())
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("name", ["avg_no_class", "map_pool", "deit_distilled", "dinov2_registers"])
def test_forward_head_of_forward_features(name):
    model = tokenslim.patch(make_model(name), r=10)
    x = images(2)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_prefix_tokens + 64, 48)  # unpatched shape
        torch.testing.assert_close(model.forward_head(feats), model(x))
        pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 48)


def test_avg_pool_is_size_weighted():
    model = tokenslim.patch(make_model("avg_no_class"), r=12)
    x = images(2)
    with torch.no_grad():
        trace = tokenslim.trace_merges(model, x)
        tokens = model.norm(trace.tokens)
        w = trace.sizes[..., None]
        weighted = (tokens * w).sum(1) / w.sum(1)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   model.fc_norm(weighted), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [5, [8, 0, 3, 7], (5, -1)])
def test_token_counts_follow_plan(r):
    model = tokenslim.patch(make_model("dinov2_registers"), r=r)
    with torch.no_grad():
        inter = model.forward_intermediates(images(2), output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
    plan = model.tokenslim_plan(5 + 64)
    assert [p.shape[1] + t.shape[1] for t, p in inter] == list(plan.tokens[1:])
    assert all(p.shape[1] == 5 for _, p in inter)


def test_forward_intermediates():
    model = make_model("dinov2_registers")
    x = images(2)
    with torch.no_grad():
        plain_final, plain_inter = model.forward_intermediates(x)
        tokenslim.patch(model, r=0)
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, plain_final)
        assert all(torch.equal(a, b) for a, b in zip(inter, plain_inter))
        model.tokenslim.r = 8
        final, grids = model.forward_intermediates(x, indices=[1, 3], norm=True)
        assert [g.shape for g in grids] == [(2, 48, 8, 8)] * 2
        torch.testing.assert_close(final, model.forward_features(x))
        nlc = model.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NLC",
                                          intermediates_only=True)
        assert [t.shape[1] for t in nlc] == [64 - 16, 64 - 32]
        # The grid repeats each merged token at every patch it holds: the distinct values of the
        # grid are exactly the NLC tokens.
        grid_tokens = grids[1].flatten(2).transpose(1, 2)
        for b in range(2):
            assert torch.unique(grid_tokens[b], dim=0).shape[0] == nlc[1].shape[1]
        out = model.forward_intermediates(x, indices=2, output_dict=True, return_prefix_tokens=True,
                                          stop_early=True)
        assert len(out["image_intermediates"]) == 2 and out["image_intermediates_prefix"][0].shape[1] == 5
        layers = model.get_intermediate_layers(x, n=1, reshape=True)
        assert layers[0].shape == (2, 48, 8, 8)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_dynamic_img_size_other_resolution():
    model = tokenslim.patch(make_model("dynamic_img"), r=6)
    x = images(2, size=48)  # 12 x 12 patches
    with torch.no_grad():
        logits = model(x)
        grids = model.forward_intermediates(x, indices=1, intermediates_only=True)
    assert logits.shape == (2, 10) and grids[0].shape == (2, 48, 12, 12)


def test_masks_refused_with_reduction():
    model = tokenslim.patch(make_model("vit"), r=4)
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(1), attn_mask=torch.ones(65, 65, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        model(images(1), is_causal=True)


def test_two_threads_and_compile():
    model = tokenslim.patch(make_model("deit_distilled"), r=8)
    xs = [images(2, seed=s) for s in (1, 2)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    explanation = torch._dynamo.explain(model)(xs[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    results = {}

    def run(i):
        with torch.no_grad():
            for _ in range(5):
                results[i] = [compiled(xs[i]), model(xs[i])]

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for got in results[i]:
            torch.testing.assert_close(got, expected[i], atol=1e-5, rtol=1e-5)


def test_training_backward_and_drop_path():
    model = tokenslim.patch(make_model("deit3_layerscale", drop_path_rate=0.3), r=8).train()
    x = images(4)
    torch.manual_seed(0)
    out1 = model(x)
    out1.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if name.startswith("blocks."):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
    torch.manual_seed(1)
    out2 = model(x)
    assert not torch.allclose(out1, out2)  # stochastic depth is active in training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_grad_checkpointing_matches():
    model = tokenslim.patch(make_model("vit"), r=8).train()
    x = images(2)
    out = model(x)
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    torch.testing.assert_close(out, out_ckpt)
    out_ckpt.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_bf16_autocast():
    model = tokenslim.patch(make_model("dinov2_registers"), r=10)
    x = images(2)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            trace = tokenslim.trace_merges(model, x)
    assert torch.isfinite(out).all()
    assert trace.sizes.dtype == torch.float32
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_unsupported_models_refused_untouched():
    from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock

    candidates = [
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, block_fn=ResPostBlock),
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2,
                          block_fn=ParallelScalingBlock),
        timm.create_model("beit_base_patch16_224", img_size=32, patch_size=4, depth=1, embed_dim=48, num_heads=3),
        timm.create_model("resnet18"),
    ]
    for model in candidates:
        cls, state = type(model), dict(model.__dict__)
        with pytest.raises(TypeError, match="cannot patch"):
            tokenslim.patch(model, r=4)
        assert type(model) is cls and model.__dict__.keys() == state.keys()
    # A mix of supported and unsupported blocks is refused as a whole.
    model = make_model("vit")
    model.blocks[3] = ResPostBlock(48, 3)
    with pytest.raises(TypeError, match="block 3"):
        tokenslim.patch(model, r=4)
    assert not tokenslim.is_patched(model)
    # A block replaced after patching is refused when reduction reaches it, naming the block.
    model = tokenslim.patch(make_model("vit"), r=4)
    model.blocks[2] = ResPostBlock(48, 3)
    with pytest.raises(TypeError, match="block 2 is now a ResPostBlock .* replaced after tokenslim.patch"):
        model(images(1))
    model.tokenslim.r = 0  # nothing reduced: timm's own blocks run, whatever they are
    assert model(images(1)).shape == (1, 10)


def test_bad_arguments():
    model = make_model("vit")
    for bad, exc in [(-1, ValueError), ([1] * 9, ValueError), ("x", TypeError), (2.5, TypeError)]:
        with pytest.raises(exc):
            tokenslim.patch(model, r=bad)
        assert not tokenslim.is_patched(model)
    with pytest.raises(TypeError, match="prop_attn"):
        tokenslim.patch(model, r=1, prop_attn="yes")
    assert not tokenslim.is_patched(model)
    with pytest.raises(TypeError, match="patched"):
        tokenslim.trace_merges(model, images(1))


def test_timm_version_check():
    from tokenslim.adapters.timm_vit import check_timm_version

    check_timm_version(timm.__version__)
    with pytest.raises(RuntimeError, match="pip install"):
        check_timm_version("1.0.15")
    with pytest.raises(RuntimeError, match="tested with"):
        check_timm_version("1.1.0")


def test_blocks_changed_after_patching():
    model = tokenslim.patch(make_model("vit"), r=2)
    model.prune_intermediate_layers(indices=[1])
    with pytest.raises(RuntimeError, match="patch"):
        model.forward_features(images(1))
    tokenslim.patch(model, r=2)
    assert model.forward_features(images(1)).shape[0] == 1


def test_every_settings_key_means_the_same_in_patch_apply_and_text():
    import inspect

    from tokenslim.spec import _patch_keywords, apply_setting, parse_setting

    assert set(_patch_keywords()) <= set(inspect.signature(tokenslim.patch).parameters)
    assert tokenslim.spec.parse_setting is tokenslim.parse_setting  # reachable from `import tokenslim`
    x = images(2)
    text = "r=2,mlp_pruned=0.25,heads_pruned=0.34"
    by_text = apply_setting(make_model("vit"), parse_setting(text))
    by_patch = tokenslim.patch(make_model("vit"), r=2, mlp_pruned=0.25, heads_pruned=0.34)
    by_apply = tokenslim.apply(make_model("vit"), text)
    by_keys = tokenslim.apply(make_model("vit"), r=2, mlp_pruned=0.25, heads_pruned=0.34)
    ref = by_text(x)
    for model in (by_patch, by_apply, by_keys):
        assert model.blocks[0].mlp.fc1.out_features == by_text.blocks[0].mlp.fc1.out_features
        assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="already carries channel pruning"):
        tokenslim.patch(by_patch, mlp_pruned=0.25)
    tokenslim.patch(by_patch, r=4)  # token settings still change freely
    with pytest.raises(TypeError, match="unknown setting keys"):
        tokenslim.apply(make_model("vit"), rr=2)
