"""Linear CKA's defining properties, the CKA matrix helper, and per-layer features/probes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.evaluation.cka import (center_gram, cka_matrix, collect_layer_features, gram_linear, layer_names,
                                    linear_cka, pool_features)
from trainer.evaluation.probes import fit_linear_probe, layer_probes, probe_accuracy


def _features(n=64, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated, non-isotropic features (a random linear map of Gaussian data, plus a mean)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return z @ torch.randn(d, d, generator=g, dtype=torch.float64) + 3.0


def _orthogonal(d, seed=1):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


@pytest.mark.parametrize("debiased", [False, True])
def test_layer_against_itself_is_one(debiased):
    x = _features()
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, abs=1e-10)
    m = cka_matrix([x, _features(seed=5)], debiased=debiased)
    assert np.allclose(np.diag(m), 1.0, atol=1e-10)
    assert np.allclose(m, m.T, atol=1e-12)


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(debiased):
    x, y = _features(seed=0), _features(seed=3)
    base = linear_cka(x, y, debiased)
    q = _orthogonal(x.shape[1])
    assert linear_cka(x @ q, y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 7.5 * y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(0.01 * (x @ q), 42.0 * (y @ _orthogonal(y.shape[1], 2)), debiased) == \
        pytest.approx(base, abs=1e-10)
    # a transformed copy of x is still "the same representation"
    assert linear_cka(x, 3.0 * x @ q, debiased) == pytest.approx(1.0, abs=1e-10)


def test_not_invariant_to_arbitrary_invertible_linear_maps():
    x = _features(n=128, d=16)
    # an invertible but badly conditioned map: stretches one direction a lot
    a = torch.eye(16, dtype=torch.float64)
    a[0, 0] = 50.0
    a[1, 0] = 3.0
    assert torch.linalg.matrix_rank(a) == 16
    assert linear_cka(x, x @ a) < 0.95


def test_unrelated_features_score_low_and_debiased_is_lower():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g, dtype=torch.float64)
    y = torch.randn(200, 32, generator=g, dtype=torch.float64)
    biased, debiased = linear_cka(x, y), linear_cka(x, y, debiased=True)
    assert biased < 0.3
    assert abs(debiased) < biased  # the biased estimator is inflated for independent features


def test_reference_formula():
    # CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) for column-centred X, Y (Kornblith et al., eq. 5).
    x, y = _features(seed=10), _features(d=9, seed=11)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.t() @ xc).norm() ** 2 / ((xc.t() @ xc).norm() * (yc.t() @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), abs=1e-10)
    k = center_gram(gram_linear(x))
    assert torch.allclose(k.sum(0), torch.zeros(k.shape[0], dtype=k.dtype), atol=1e-8)


def test_feature_pooling_and_layer_features():
    from trainer.models import build_encoder

    torch.manual_seed(0)
    enc = build_encoder({"arch": "resnet18", "width": 4}, "digits", with_projector=False)
    x = torch.rand(10, 3, 16, 16)
    flat = collect_layer_features(enc, x, "flatten", batch_size=4)
    avg = collect_layer_features(enc, x, "avg", batch_size=4)
    assert [f.shape[1] for f in avg] == [4, 4, 8, 16, 32, 32]
    assert [f.shape[1] for f in flat] == [4 * 256, 4 * 256, 8 * 64, 16 * 16, 32 * 4, 32]
    assert layer_names(len(flat)) == ["stem", "layer1", "layer2", "layer3", "layer4", "pool"]
    assert torch.allclose(avg[-1], enc.eval()(x), atol=1e-5)  # last entry = the pooled feature
    assert pool_features(torch.ones(2, 3, 4, 4), "avg").shape == (2, 3)
    with pytest.raises(ValueError, match="pooling"):
        pool_features(torch.ones(2, 3, 4, 4), "max")


def test_probe_learns_a_linearly_separable_layer_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    centres = torch.randn(3, 8, generator=g) * 4
    good = centres[y] + torch.randn(300, 8, generator=g)
    noise = torch.randn(300, 8, generator=g)
    probe = fit_linear_probe(good[:200], y[:200], 3)
    assert probe_accuracy(probe, good[200:], y[200:]) > 0.9
    res = layer_probes([good[:200], noise[:200]], y[:200], [good[200:], noise[200:]], y[200:], 3,
                       test_adv=[noise[200:], noise[200:]], train_adv=[noise[:200], noise[:200]])
    assert res["clean"][0] > 0.9 and res["clean"][1] < 0.6
    assert set(res) == {"clean", "adv", "adv_trained"} and all(len(v) == 2 for v in res.values())
