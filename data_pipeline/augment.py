"""Batched, per-sample SimCLR colour augmentation on the device (the part FFCV 1.0.2 lacks).

FFCV decodes, random-resized-crops and flips on CPU threads; colour jitter (brightness,
contrast, saturation, hue, in a random order per sample, as torchvision's ColorJitter) and
random grayscale run here on the whole batch at once, on whatever device the batch is on.
Input/output: float [B, 3, H, W] in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * a + (1 - f) * b).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dc = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x[:, 0], x[:, 1], x[:, 2]
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = torch.stack([
        torch.stack([v, q, p, p, t, v], 1),
        torch.stack([t, v, v, q, p, p], 1),
        torch.stack([p, p, t, v, v, q], 1),
    ], dim=1)  # [B, 3, 6, H, W]
    return choices.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


@dataclass(frozen=True)
class ColorAugConfig:
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2


def color_augment(x: torch.Tensor, cfg: ColorAugConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomApply(ColorJitter, p) then RandomGrayscale(p), independently per sample."""
    b = x.shape[0]
    dev = x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, device="cpu", generator=generator).to(dev)

    def factor(strength: float, lo_clip: float = 0.0) -> torch.Tensor:
        lo, hi = max(lo_clip, 1 - strength), 1 + strength
        return (lo + (hi - lo) * rand(b)).view(b, 1, 1, 1).to(x.dtype)

    apply = (rand(b) < cfg.jitter_p).view(b, 1, 1, 1)
    fb, fc, fs = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    fh = ((rand(b) * 2 - 1) * cfg.hue).view(b, 1, 1).to(x.dtype)
    order = torch.argsort(rand(b, 4), dim=1).to(dev)  # a random permutation of the 4 ops per sample
    out = x
    for position in range(4):
        op = order[:, position].view(b, 1, 1, 1)
        y = out
        if cfg.brightness > 0:
            y = torch.where(op == 0, (out * fb).clamp(0, 1), y)
        if cfg.contrast > 0:
            mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
            y = torch.where(op == 1, _blend(out, mean, fc), y)
        if cfg.saturation > 0:
            y = torch.where(op == 2, _blend(out, _gray(out), fs), y)
        if cfg.hue > 0:
            hsv = rgb_to_hsv(out)
            hsv = torch.cat([((hsv[:, :1] + fh[:, None]) % 1.0), hsv[:, 1:]], dim=1)
            y = torch.where(op == 3, hsv_to_rgb(hsv), y)
        out = y
    out = torch.where(apply, out, x)
    gray = (rand(b) < cfg.grayscale_p).view(b, 1, 1, 1)
    return torch.where(gray, _gray(out).expand_as(out), out)
