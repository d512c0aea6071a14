"""Batched, per-sample SimCLR colour augmentation on the device (the part FFCV 1.0.2 lacks).

FFCV decodes, random-resized-crops and flips on CPU threads; colour jitter and random grayscale
run here on the whole batch, on whatever device the batch is on. Semantics follow torchvision:

    RandomApply([ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p)
    RandomGrayscale(p=grayscale_p)

independently per sample: each sample draws its own apply/grayscale coins, its own factors
(brightness/contrast/saturation uniform in [max(0, 1-s), 1+s], hue uniform in [-h, h]) and its
own random order of the four operations, exactly like `ColorJitter.get_params`. The operations
are torchvision's float formulas (`adjust_brightness`, `adjust_contrast` (blend with the mean
grey level), `adjust_saturation` (blend with the grey image), `adjust_hue` (HSV rotation),
`rgb_to_grayscale` with weights 0.2989/0.587/0.114); results are clamped to [0, 1].

The parameters come from uniforms drawn on the CPU (the loaders draw them counter-based per
sample: data_pipeline.seeded; `color_augment` from a `torch.Generator`), so no device sync is
needed; each op is then applied only to the samples that need it at that position of their
order, so the work is 4 ops per jittered sample, not 16.
Input/output: float [B, 3, H, W] in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
OPS = ("brightness", "contrast", "saturation", "hue")


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] (ITU-R 601-2 luma, torchvision's weights)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, f.view(-1, 1, 1, 1))


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, rgb_to_gray(x), f.view(-1, 1, 1, 1))


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> HSV in [0, 1] (torchvision's `_rgb2hsv`)."""
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] HSV in [0, 1] -> RGB. Closed form, equal to torchvision's piecewise `_hsv2rgb`:
    channel n in (R: 5, G: 3, B: 1): v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6."""
    h, s, v = x.unbind(dim=1)
    h6 = h.unsqueeze(1) * 6.0
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6, 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return (v.unsqueeze(1) * (1 - s.unsqueeze(1) * w)).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue (RGB -> HSV, h += f mod 1, HSV -> RGB), fused: with v = max,
    v*s = max - min = chroma, so each channel is max - chroma * w((n + 6h) mod 6) and the S and V
    planes are never materialised. Equal to torchvision to float rounding (tested)."""
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    chroma = maxc - minc
    inv = 1.0 / torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(dim=1)
    h6 = torch.where(maxc == r, (g - b) * inv,
                     torch.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv))
    h6 = h6 + 6.0 * f.view(-1, 1, 1)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + h6.unsqueeze(1), 6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0, 1)
    return (maxc.unsqueeze(1) - chroma.unsqueeze(1) * w).clamp_(0, 1)


OP_FNS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass(frozen=True)
class ColorAugConfig:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self) -> None:
        for k in ("brightness", "contrast", "saturation"):
            if getattr(self, k) < 0:
                raise ValueError(f"augment.color.{k} must be >= 0, got {getattr(self, k)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"augment.color.hue must be in [0, 0.5], got {self.hue}")
        for k in ("jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, k) <= 1:
                raise ValueError(f"augment.color.{k} must be in [0, 1], got {getattr(self, k)}")


@dataclass
class ColorParams:
    """Per-sample parameters (CPU tensors): which samples are jittered/greyed, factors, op order."""

    apply: torch.Tensor        # bool [B]
    factors: torch.Tensor      # float [B, 4]: brightness, contrast, saturation, hue
    order: torch.Tensor        # int64 [B, 4]: a permutation of 0..3 per sample
    gray: torch.Tensor         # bool [B]


COLOR_DRAWS = 10  # apply, grayscale, 4 factors, 4 for the order of the operations


def params_from_uniforms(u: torch.Tensor, cfg: ColorAugConfig) -> ColorParams:
    """Per-sample parameters from uniforms u [B, COLOR_DRAWS] in [0, 1), with the distributions of
    torchvision's RandomApply(ColorJitter, p) and RandomGrayscale(p)."""
    u = u.to(torch.float64)
    apply = u[:, 0] < cfg.jitter_p
    gray = u[:, 1] < cfg.grayscale_p
    factors = torch.empty(u.shape[0], 4, dtype=torch.float64)
    for j, strength in enumerate((cfg.brightness, cfg.contrast, cfg.saturation)):
        lo, hi = max(0.0, 1 - strength), 1 + strength
        factors[:, j] = lo + (hi - lo) * u[:, 2 + j]
    factors[:, 3] = (u[:, 5] * 2 - 1) * cfg.hue
    order = torch.argsort(u[:, 6:10], dim=1)  # a uniformly random permutation of the four operations
    return ColorParams(apply, factors, order, gray)


def sample_params(batch: int, cfg: ColorAugConfig, generator: torch.Generator | None = None) -> ColorParams:
    """Draw per-sample parameters from a torch generator (the loaders draw counter-based uniforms)."""
    return params_from_uniforms(torch.rand(batch, COLOR_DRAWS, generator=generator, dtype=torch.float64), cfg)


def apply_params(x: torch.Tensor, p: ColorParams, cfg: ColorAugConfig) -> torch.Tensor:
    """Apply the sampled jitter/grayscale to float [B, 3, H, W] in [0, 1] (returns a new tensor)."""
    out = x.clone()
    dev = x.device
    enabled = (cfg.brightness > 0, cfg.contrast > 0, cfg.saturation > 0, cfg.hue > 0)
    if bool(p.apply.any()):
        for position in range(4):
            at = p.order[:, position]
            for op in range(4):
                if not enabled[op]:  # torchvision skips an op whose strength is 0
                    continue
                idx_cpu = torch.nonzero(p.apply & (at == op)).flatten()
                if idx_cpu.numel() == 0:
                    continue
                idx = idx_cpu.to(dev, non_blocking=True)
                f = p.factors[idx_cpu, op].to(device=dev, dtype=x.dtype, non_blocking=True)
                out.index_copy_(0, idx, OP_FNS[op](out.index_select(0, idx), f))
    idx_cpu = torch.nonzero(p.gray).flatten()
    if idx_cpu.numel():
        idx = idx_cpu.to(dev, non_blocking=True)
        out.index_copy_(0, idx, rgb_to_gray(out.index_select(0, idx)).expand(-1, 3, -1, -1))
    return out


def color_augment(x: torch.Tensor, cfg: ColorAugConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomApply(ColorJitter, p) then RandomGrayscale(p), independently per sample."""
    return apply_params(x, sample_params(x.shape[0], cfg, generator), cfg)
