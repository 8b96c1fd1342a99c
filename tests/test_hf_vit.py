"""The transformers adapter: r=0 equals the unpatched model; reduction equals the timm adapter on the same weights."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers extra is not installed")

import timm  # noqa: E402

import tokenslim  # noqa: E402
from tokenslim.adapters.hf_vit import check_transformers_version  # noqa: E402

DIM, DEPTH, HEADS, IMG, PATCH, CLASSES = 48, 4, 3, 32, 4, 10
COMMON = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH,
              layer_norm_eps=1e-6)


def _images(n=3, seed=0):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _init(model, seed=0):
    # Random LayerNorm affine and biases too, so a wrong wiring cannot hide behind default values.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def hf_models():
    from transformers import (CLIPVisionConfig, CLIPVisionModel, DeiTConfig, DeiTForImageClassificationWithTeacher,
                              DeiTModel, Dinov2Config, Dinov2ForImageClassification, Dinov2Model,
                              Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTConfig,
                              ViTForImageClassification, ViTModel)

    vit = dict(COMMON, intermediate_size=2 * DIM, num_labels=CLASSES)
    dino = dict(COMMON, mlp_ratio=2, num_labels=CLASSES)
    return {
        "ViTModel": lambda: ViTModel(ViTConfig(**vit)),
        "ViTForImageClassification": lambda: ViTForImageClassification(ViTConfig(**vit)),
        "DeiTModel": lambda: DeiTModel(DeiTConfig(**vit)),
        "DeiTForImageClassificationWithTeacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**vit)),
        "Dinov2Model": lambda: Dinov2Model(Dinov2Config(**dino)),
        "Dinov2ForImageClassification": lambda: Dinov2ForImageClassification(Dinov2Config(**dino)),
        "Dinov2WithRegistersModel": lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=2, **dino)),
        "CLIPVisionModel": lambda: CLIPVisionModel(CLIPVisionConfig(**dict(COMMON, intermediate_size=2 * DIM,
                                                                           hidden_act="gelu"))),
    }


NAMES = list(hf_models())


def _outputs(out):
    if hasattr(out, "logits"):
        return [out.logits]
    return [out.last_hidden_state] + ([out.pooler_output] if out.pooler_output is not None else [])


def test_installed_release_is_tested():
    check_transformers_version()
    with pytest.raises(RuntimeError, match="pip install 'transformers>=5.24,<5.25'"):
        check_transformers_version("4.46.0")


@pytest.mark.parametrize("name", NAMES)
def test_r0_equals_unpatched(name):
    model = _init(hf_models()[name]())
    x = _images()
    with torch.no_grad():
        expected = _outputs(model(x))
        tokenslim.patch(model, r=0)
        assert tokenslim.is_patched(model)
        got = _outputs(model(x))
    for e, g in zip(expected, got):
        assert torch.equal(e, g), f"{name}: r=0 differs by {(e - g).abs().max().item()}"
    tokenslim.unpatch(model)
    assert not tokenslim.is_patched(model) and not hasattr(model, "tokenslim")
    with torch.no_grad():
        assert torch.equal(_outputs(model(x))[0], expected[0])


@pytest.mark.parametrize("name", NAMES)
def test_reduction_runs_with_unpatched_shapes(name):
    model = _init(hf_models()[name]())
    x = _images()
    with torch.no_grad():
        plain = _outputs(model(x))
        tokenslim.patch(model, r=6, keep_rate=0.7, prune_layers=(1,), fuse_pruned=True)
        reduced = _outputs(model(x))
    for p, r in zip(plain, reduced):
        assert p.shape == r.shape and torch.isfinite(r).all()
        assert not torch.equal(p, r)
    keys = set(dict(model.named_parameters()))
    tokenslim.unpatch(model)
    assert keys == set(dict(model.named_parameters()))


def _timm_from_hf_vit(hf, distilled=False, layer_scale=False, registers=0, clip=False):
    """A timm ViT carrying the weights of a transformers ViT/DeiT/DINOv2/CLIP vision model."""
    kwargs = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=2.0,
                  num_classes=0, global_pool="token", qkv_bias=True)
    if layer_scale:
        kwargs["init_values"] = 1.0
    if registers:
        kwargs.update(reg_tokens=registers, no_embed_class=True)
    if clip:
        kwargs.update(pre_norm=True)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, **kwargs)
    sd = {}
    emb = hf.embeddings
    if clip:
        sd["patch_embed.proj.weight"] = emb.patch_embedding.weight
        sd["cls_token"] = emb.class_embedding.view(1, 1, -1)
        sd["pos_embed"] = emb.position_embedding.weight.unsqueeze(0)
        sd["norm_pre.weight"], sd["norm_pre.bias"] = hf.pre_layrnorm.weight, hf.pre_layrnorm.bias
    else:
        sd["patch_embed.proj.weight"] = emb.patch_embeddings.projection.weight
        sd["patch_embed.proj.bias"] = emb.patch_embeddings.projection.bias
        sd["cls_token"] = emb.cls_token
        pos = emb.position_embeddings
        if registers:
            # timm keeps register models' position embeddings on the patches only (no_embed_class).
            sd["reg_token"] = emb.register_tokens
            sd["cls_token"] = emb.cls_token + pos[:, :1]
            pos = pos[:, 1:]
        if distilled:
            sd["dist_token"] = emb.distillation_token
        sd["pos_embed"] = pos
    layers = hf.layers if hasattr(hf, "layers") else (hf.encoder.layers if clip else hf.encoder.layer)
    for i, layer in enumerate(layers):
        p = f"blocks.{i}."
        if clip:
            attn, n1, n2, out = layer.self_attn, layer.layer_norm1, layer.layer_norm2, layer.self_attn.out_proj
        elif layer_scale:
            attn, n1, n2, out = layer.attention, layer.norm1, layer.norm2, layer.attention.o_proj
            sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
        else:
            attn, n1, n2, out = layer.attention, layer.layernorm_before, layer.layernorm_after, layer.attention.o_proj
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = n1.weight, n1.bias
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = n2.weight, n2.bias
        sd[p + "attn.qkv.weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        sd[p + "attn.qkv.bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = out.weight, out.bias
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = layer.mlp.fc1.weight, layer.mlp.fc1.bias
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = layer.mlp.fc2.weight, layer.mlp.fc2.bias
    if not clip:
        sd["norm.weight"], sd["norm.bias"] = hf.layernorm.weight, hf.layernorm.bias
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith(("norm.", "head")) for k in missing), missing
    if clip:
        model.norm = torch.nn.Identity()  # CLIP's last_hidden_state is the encoder output, no final norm
    return model.eval()


SETTINGS = [dict(r=5), dict(r=(4, -1), method="mlerp"), dict(keep_rate=0.6, prune_layers=(1, 2)),
            dict(keep_rate=0.7, prune_layers=(1,), fuse_pruned=True, r=4), dict(r=6, method="diffrate"),
            dict(r=4, method="ppt", threshold=0.0)]


@pytest.mark.parametrize("kind", ["vit", "deit", "dinov2", "dinov2_registers", "clip"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_transformers_equals_timm_on_same_weights(kind, settings):
    models = hf_models()
    name = {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model",
            "dinov2_registers": "Dinov2WithRegistersModel", "clip": "CLIPVisionModel"}[kind]
    hf = _init(models[name]())
    tm = _timm_from_hf_vit(hf, distilled=kind == "deit", layer_scale=kind.startswith("dinov2"),
                           registers=2 if kind == "dinov2_registers" else 0, clip=kind == "clip")
    x = _images(4)
    with torch.no_grad():
        unpatched = tm.forward_features(x)
        assert (hf(x).last_hidden_state - unpatched).abs().max() < 1e-4, "the weight conversion is wrong"
        tokenslim.patch(hf, **settings)
        tokenslim.patch(tm, **settings)
        expected = tm.forward_features(x)
        got = hf(x).last_hidden_state
    diff = (got - expected).abs().max().item()
    assert diff < 1e-4, f"{kind} {settings}: transformers and timm differ by {diff}"
    assert (expected - unpatched).abs().max() > 1e-3  # the setting did reduce something


def test_hidden_states_and_pooled_output():
    from transformers import ViTConfig, ViTModel

    model = _init(ViTModel(ViTConfig(**dict(COMMON, intermediate_size=2 * DIM))))
    x = _images(2)
    with torch.no_grad():
        plain = model(x, output_hidden_states=True)
        tokenslim.patch(model, r=8)
        out = model(x, output_hidden_states=True)
        tup = model(x, return_dict=False)
    assert len(out.hidden_states) == len(plain.hidden_states) == DEPTH + 1
    assert all(h.shape == (2, 65, DIM) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[0], plain.hidden_states[0])  # the embeddings: nothing merged yet
    # Merged tokens are repeated over the patches they hold: 65 positions, 65 - 8 distinct rows after layer 1.
    assert torch.unique(out.hidden_states[1][0], dim=0).shape[0] == 65 - 8
    # The pooler reads the class token of the final (normed) sequence.
    torch.testing.assert_close(out.pooler_output, model.pooler(out.last_hidden_state))
    assert torch.equal(tup[0], out.last_hidden_state)


def test_distillation_head_and_dinov2_mean_head():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    model = _init(DeiTForImageClassificationWithTeacher(DeiTConfig(**dict(COMMON, intermediate_size=2 * DIM,
                                                                             num_labels=CLASSES))))
    x = _images(2)
    tokenslim.patch(model, r=8)
    assert model.tokenslim is model.deit.tokenslim
    with torch.no_grad():
        out = model(x)
        seq = model.deit(x).last_hidden_state
    torch.testing.assert_close(out.cls_logits, model.cls_classifier(seq[:, 0]))
    torch.testing.assert_close(out.distillation_logits, model.distillation_classifier(seq[:, 1]))
    model.tokenslim.r = 0  # settings stay writable, as for timm
    with torch.no_grad():
        assert model(x).logits.shape == (2, CLASSES)


def test_clear_errors():
    from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTModel

    model = _init(ViTModel(ViTConfig(**dict(COMMON, intermediate_size=2 * DIM))))
    tokenslim.patch(model, r=4)
    with pytest.raises(ValueError, match="output_attentions=True cannot be combined with token reduction"):
        model(_images(1), output_attentions=True)
    with pytest.raises(ValueError, match="r must be >= 0"):
        tokenslim.patch(model, r=-1)
    dino = Dinov2ForImageClassification(Dinov2Config(**dict(COMMON, mlp_ratio=2, num_labels=CLASSES)))
    with pytest.raises(ValueError, match="set fuse_pruned=True"):
        tokenslim.patch(dino, keep_rate=0.5, prune_layers=(1,))
    from transformers import BertConfig, BertModel

    with pytest.raises(TypeError, match="holds none of the supported transformers vision models"):
        tokenslim.patch(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32)), r=2)


def test_state_dict_deepcopy_and_training():
    from transformers import ViTConfig, ViTForImageClassification

    model = _init(ViTForImageClassification(ViTConfig(**dict(COMMON, intermediate_size=2 * DIM, num_labels=CLASSES))))
    keys = list(model.state_dict())
    tokenslim.patch(model, r=6)
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(clone(x).logits, model(x).logits)
    model.train()
    loss = model(x, labels=torch.tensor([1, 2])).loss
    loss.backward()
    assert model.vit.layers[-1].mlp.fc1.weight.grad is not None


def test_channel_pruning_refused_clearly():
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(**dict(COMMON, intermediate_size=2 * DIM)))
    with pytest.raises(TypeError, match="channel pruning .* supports timm ViTs only; ViTModel is a Hugging Face"):
        tokenslim.prune_channels(model, heads_pruned=0.34)
    from tokenslim.spec import apply_setting, parse_setting

    apply_setting(model, parse_setting("r=4,method=mlerp"))  # settings text drives the transformers adapter too
    assert model.tokenslim.method == "mlerp"
