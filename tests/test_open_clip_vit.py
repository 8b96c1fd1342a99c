"""The open_clip adapter: r=0 is exact, reduction equals timm on the same weights, timm trunks go through timm."""
from functools import partial

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="the open_clip extra is not installed")

import timm  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

import tokenslim  # noqa: E402

DIM, DEPTH, IMG, PATCH = 48, 4, 32, 4


def _clip(pool="tok", seed=0, **vision):
    torch.manual_seed(seed)
    cfg = CLIPVisionCfg(layers=DEPTH, width=DIM, head_width=16, patch_size=PATCH, image_size=IMG, mlp_ratio=2.0,
                        pool_type=pool, **vision)
    model = CLIP(embed_dim=32, vision_cfg=cfg,
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.visual.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def _images(n=3):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _timm_twin(visual):
    """A timm ViT with the open_clip tower's weights; its forward_features is the tower's token output."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH,
                              embed_dim=DIM, depth=DEPTH, num_heads=DIM // 16, mlp_ratio=2.0, num_classes=0,
                              pre_norm=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))
    sd = {"patch_embed.proj.weight": visual.conv1.weight, "cls_token": visual.class_embedding.view(1, 1, -1),
          "pos_embed": visual.positional_embedding.unsqueeze(0),
          "norm_pre.weight": visual.ln_pre.weight, "norm_pre.bias": visual.ln_pre.bias}
    for i, b in enumerate(visual.transformer.resblocks):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": b.ln_1.weight, p + "norm1.bias": b.ln_1.bias,
                   p + "attn.qkv.weight": b.attn.in_proj_weight, p + "attn.qkv.bias": b.attn.in_proj_bias,
                   p + "attn.proj.weight": b.attn.out_proj.weight, p + "attn.proj.bias": b.attn.out_proj.bias,
                   p + "norm2.weight": b.ln_2.weight, p + "norm2.bias": b.ln_2.bias,
                   p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
                   p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {"norm.weight", "norm.bias"}
    model.norm = torch.nn.Identity()  # compare the transformer's output, before open_clip's ln_post
    return model.eval()


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_r0_equals_unpatched_and_unpatch(pool):
    model = _clip(pool)
    x = _images()
    with torch.no_grad():
        expected = model.encode_image(x)
        tokenslim.patch(model, r=0)
        assert tokenslim.is_patched(model) and model.tokenslim is model.visual.tokenslim
        assert torch.equal(model.encode_image(x), expected)
        model.tokenslim.r = 6
        reduced = model.encode_image(x)
        tokenslim.unpatch(model)
        assert not tokenslim.is_patched(model) and not hasattr(model, "tokenslim")
        assert torch.equal(model.encode_image(x), expected)
    assert reduced.shape == expected.shape and not torch.equal(reduced, expected)


SETTINGS = [dict(r=5), dict(r=(4, -1)), dict(keep_rate=0.6, prune_layers=(1, 2)),
            dict(keep_rate=0.7, prune_layers=(1,), fuse_pruned=True, r=4), dict(r=6, method="pitome")]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_open_clip_equals_timm_on_same_weights(settings):
    model = _clip()
    twin = _timm_twin(model.visual)
    x = _images(4)
    visual = model.visual
    with torch.no_grad():
        tokens = visual.transformer(visual._embeds(x))
        assert (tokens - twin.forward_features(x)).abs().max() < 1e-4, "the weight conversion is wrong"
        tokenslim.patch(model, **settings)
        tokenslim.patch(twin, **settings)
        got = visual.transformer(visual._embeds(x))
        expected = twin.forward_features(x)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, f"{settings}: open_clip and timm differ by {diff}"
    assert (expected - tokens).abs().max() > 1e-3


def test_avg_pool_is_size_weighted_and_intermediates_are_full_length():
    model = _clip("avg")
    tokenslim.patch(model, r=8)
    x = _images(2)
    with torch.no_grad():
        out = model.visual.forward_intermediates(x, indices=[1, 3], output_fmt="NCHW")
    assert [t.shape for t in out["image_intermediates"]] == [(2, DIM, 8, 8)] * 2
    assert out["image_features"].shape == (2, 32)


def test_timm_trunk_goes_through_the_timm_adapter():
    torch.manual_seed(0)
    cfg = CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False, timm_pool="token",
                        timm_proj="linear", image_size=64, patch_size=16)
    model = CLIP(embed_dim=32, vision_cfg=cfg,
                 text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)).eval()
    model.visual.set_input_size(64)  # a 4x4 grid keeps the test fast
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.encode_image(x)
        tokenslim.patch(model, r=0)
        assert tokenslim.is_patched(model) and tokenslim.is_patched(model.visual.trunk)
        assert torch.equal(model.encode_image(x), expected)
        model.tokenslim.r = 4
        assert model.visual.trunk.tokenslim.r == 4
        assert not torch.equal(model.encode_image(x), expected)
        tokenslim.unpatch(model)
        assert not tokenslim.is_patched(model)
        assert torch.equal(model.encode_image(x), expected)


def test_clear_errors():
    model = _clip("avg")
    with pytest.raises(ValueError, match="set fuse_pruned=True"):
        tokenslim.patch(model, keep_rate=0.5, prune_layers=(1,))
    assert not tokenslim.is_patched(model)
    with pytest.raises(TypeError, match="only open_clip's ResidualAttentionBlock"):
        tokenslim.patch(_clip(qk_norm=True), r=2)  # qk-norm towers use CustomResidualAttentionBlock
    with pytest.raises(TypeError, match="no open_clip VisionTransformer"):
        tokenslim.patch(model.transformer, r=2)  # the text transformer
