"""Batched colour augmentation == torchvision's ColorJitter / RandomApply / RandomGrayscale."""
from __future__ import annotations

import itertools

import pytest
import torch
import torchvision.transforms.functional as TF

from data_pipeline.augment import (ColorAugConfig, adjust_brightness, adjust_contrast, adjust_hue,
                                   adjust_saturation, apply_params, color_augment, hsv_to_rgb, rgb_to_gray,
                                   rgb_to_hsv, sample_params)

TV_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _images(b: int = 12, size: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    x[0] = 0.5                      # grey: hue undefined, saturation 0
    x[1, :, :3] = 0.0               # black pixels
    x[1, :, 3:6] = 1.0              # white pixels
    x[2, 0], x[2, 1], x[2, 2] = 1.0, 0.0, 0.0  # pure red (hue 0 / 1 boundary)
    x[3, 1] = x[3, 0]               # r == g ties
    return x


@pytest.mark.parametrize("op, ours, factors", [
    (0, adjust_brightness, [0.0, 0.6, 1.0, 1.4, 2.0]),
    (1, adjust_contrast, [0.0, 0.6, 1.0, 1.4, 2.0]),
    (2, adjust_saturation, [0.0, 0.6, 1.0, 1.4, 2.0]),
    (3, adjust_hue, [-0.5, -0.1, 0.0, 0.05, 0.1, 0.37, 0.5]),
])
def test_single_ops_match_torchvision(op, ours, factors):
    x = _images()
    for f in factors:
        got = ours(x, torch.full((len(x),), f))
        ref = torch.stack([TV_OPS[op](img, f) for img in x])
        torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)


def test_hsv_conversions_match_torchvision():
    from torchvision.transforms._functional_tensor import _hsv2rgb, _rgb2hsv

    x = _images(b=16, size=11, seed=1)
    torch.testing.assert_close(rgb_to_hsv(x), torch.stack([_rgb2hsv(i) for i in x]), atol=1e-6, rtol=0)
    hsv = torch.rand(16, 3, 11, 11)
    torch.testing.assert_close(hsv_to_rgb(hsv), torch.stack([_hsv2rgb(i) for i in hsv]), atol=2e-6, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=2e-6, rtol=0)
    torch.testing.assert_close(rgb_to_gray(x), torch.stack([TF.rgb_to_grayscale(i) for i in x]))


def test_full_augmentation_equals_torchvision_per_sample():
    """Given the sampled parameters, each sample is torchvision's ops in that sample's order."""
    cfg = ColorAugConfig(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2)
    x = _images(b=64, size=8, seed=2)
    p = sample_params(len(x), cfg, torch.Generator().manual_seed(0))
    got = apply_params(x, p, cfg)
    for i in range(len(x)):
        ref = x[i]
        if p.apply[i]:
            for op in p.order[i].tolist():
                ref = TV_OPS[op](ref, float(p.factors[i, op]))
        if p.gray[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        torch.testing.assert_close(got[i], ref, atol=3e-6, rtol=0)
    assert bool(p.apply.any()) and bool((~p.apply).any()) and bool(p.gray.any())


def test_parameter_distributions_follow_torchvision():
    cfg = ColorAugConfig(brightness=0.4, contrast=0.3, saturation=0.2, hue=0.1, jitter_p=0.8, grayscale_p=0.2)
    n = 24_000
    p = sample_params(n, cfg, torch.Generator().manual_seed(1))
    assert abs(p.apply.float().mean().item() - 0.8) < 0.015
    assert abs(p.gray.float().mean().item() - 0.2) < 0.015
    assert abs((p.apply & p.gray).float().mean().item() - 0.16) < 0.015  # independent coins
    for j, (lo, hi) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        f = p.factors[:, j]
        assert lo <= f.min() and f.max() <= hi
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo) + 1e-3
        assert abs(f.std().item() - (hi - lo) / 12 ** 0.5) < 0.02 * (hi - lo)  # uniform
    # The order is a uniformly random permutation of the 4 ops, per sample.
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    code = (p.order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    perm_codes = [sum(v * w for v, w in zip(q, (64, 16, 4, 1))) for q in itertools.permutations(range(4))]
    counts = torch.bincount(code, minlength=256).float()
    assert counts[perm_codes].sum() == n
    assert (counts[perm_codes] / n - 1 / 24).abs().max() < 0.01
    # Brightness factor never below 0 for strengths > 1 (torchvision clips the range at 0).
    strong = sample_params(2000, ColorAugConfig(brightness=1.5), torch.Generator().manual_seed(2))
    assert strong.factors[:, 0].min() >= 0 and strong.factors[:, 0].max() <= 2.5


def test_observed_probabilities_on_images():
    """On colourful images: ~20% come out grey; ~80% x 80%... are changed by the jitter."""
    cfg = ColorAugConfig()
    x = torch.rand(4000, 3, 4, 4)
    out = color_augment(x, cfg, torch.Generator().manual_seed(3))
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert abs(grey.float().mean().item() - 0.2) < 0.03
    unchanged = (out == x).all(dim=(1, 2, 3))
    assert abs(unchanged.float().mean().item() - 0.2 * 0.8) < 0.03  # neither jitter nor grey
    assert float(out.min()) >= 0 and float(out.max()) <= 1 and out.dtype == x.dtype


def test_edge_configs_and_reproducibility():
    x = torch.rand(32, 3, 6, 6)
    off = ColorAugConfig(brightness=0, contrast=0, saturation=0, hue=0, jitter_p=1.0, grayscale_p=0.0)
    torch.testing.assert_close(color_augment(x, off), x)
    all_grey = color_augment(x, ColorAugConfig(jitter_p=0.0, grayscale_p=1.0))
    torch.testing.assert_close(all_grey, rgb_to_gray(x).expand(-1, 3, -1, -1))
    cfg = ColorAugConfig()
    a = color_augment(x, cfg, torch.Generator().manual_seed(5))
    b = color_augment(x, cfg, torch.Generator().manual_seed(5))
    c = color_augment(x, cfg, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    before = x.clone()
    color_augment(x, cfg)
    assert torch.equal(x, before)  # the input is not modified
    with pytest.raises(ValueError, match="hue"):
        ColorAugConfig(hue=0.6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_result_on_gpu():
    cfg = ColorAugConfig()
    x = torch.rand(64, 3, 16, 16)
    p = sample_params(64, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_params(x.cuda(), p, cfg).cpu(), apply_params(x, p, cfg), atol=1e-5, rtol=0)
