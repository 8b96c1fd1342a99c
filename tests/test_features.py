"""Feature fidelity: cosine similarity of pooled features to the unpatched model, checked against
a plain computation written here."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import tokenslim
from conftest import images, make_model
from tokenslim.evaluate.features import feature_fidelity


def _data(n=6):
    return TensorDataset(images(n, seed=3), torch.zeros(n, dtype=torch.long))


def test_unreduced_model_is_identical():
    model = make_model("vit")
    fid = feature_fidelity(tokenslim.patch(copy.deepcopy(model), r=0), model, _data(), batch_size=4, progress=False)
    assert fid.images == 6
    assert fid.cls_cos == pytest.approx(1.0, abs=1e-6) and fid.patch_cos == pytest.approx(1.0, abs=1e-6)


def test_matches_a_plain_computation_on_a_reduced_model():
    model = make_model("deit3_layerscale")
    reduced = tokenslim.patch(copy.deepcopy(model), r=4)
    x = images(6, seed=3)
    with torch.no_grad():
        ref, red = model.forward_features(x), reduced.forward_features(x)
        # the reduced model's patch mean is the size-weighted mean of its merged tokens
        cls = F.cosine_similarity(red[:, 0], ref[:, 0], dim=-1)
        patch = F.cosine_similarity(red[:, 1:].mean(1), ref[:, 1:].mean(1), dim=-1)
    fid = feature_fidelity(reduced, model, _data(), batch_size=4, progress=False)
    assert fid.cls_cos == pytest.approx(float(cls.mean()), abs=1e-6)
    assert fid.patch_cos == pytest.approx(float(patch.mean()), abs=1e-6)
    assert fid.patch_cos_se == pytest.approx(float(patch.std() / 6 ** 0.5), abs=1e-6)
    assert fid.cls_cos < 1.0  # merging changed something


def test_models_without_a_class_token_report_patch_features_only():
    model = make_model("avg_no_class")
    fid = feature_fidelity(tokenslim.patch(copy.deepcopy(model), r=4), model, _data(), progress=False)
    assert fid.cls_cos is None and 0.0 < fid.patch_cos <= 1.0 + 1e-6


def test_bad_batch_size_is_refused():
    model = make_model("vit")
    with pytest.raises(ValueError, match="batch_size"):
        feature_fidelity(model, model, _data(), batch_size=0)


def test_precomputed_reference_features_give_the_same_result():
    from tokenslim.evaluate.features import reference_features

    model = make_model("vit")
    reduced = tokenslim.patch(copy.deepcopy(model), r=4)
    direct = feature_fidelity(reduced, model, _data(), batch_size=4, progress=False)
    pooled = reference_features(model, _data(), batch_size=4)
    cached = feature_fidelity(reduced, None, _data(), batch_size=4, progress=False, reference_pooled=pooled)
    assert cached == direct
    with pytest.raises(ValueError, match="same data and batch size"):
        feature_fidelity(reduced, None, _data(), batch_size=2, progress=False, reference_pooled=pooled)
