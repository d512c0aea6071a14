"""The views a method trains on, made from one decoded batch: SSL views, the weak view, the original.

    views = make_views(x, index, epoch, ["ssl", "ssl"], aug, seed)

`x` is the decoded batch (float [B, 3, H, W] in [0, 1], on the training device) and `index` the
samples' positions in the dataset. Every random choice (crop box, flip, padding offset, colour
jitter and grayscale) is drawn counter-based from (seed, epoch, sample index, view), so a sample's
views in an epoch are the same whatever the thread scheduling, the batch it lands in, the number
of workers, or where a run was resumed.

- "ssl": torchvision's RandomResizedCrop(res, scale, ratio 3/4..4/3; `interpolation`), then
  RandomHorizontalFlip, then RandomApply(ColorJitter, p) and RandomGrayscale(p) (SimCLR's views);
- "weak": RandomCrop(res, padding, zero fill) then RandomHorizontalFlip (DeACL, fine-tuning);
- "plain": the image as stored (evaluation, RoCL's original).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from data_pipeline import geometry
from data_pipeline.augment import COLOR_DRAWS, ColorAugConfig, apply_params, params_from_uniforms
from data_pipeline.seeded import uniforms

VIEW_STREAMS = 16  # streams per view position: "ssl" and "weak" draws of view v use stream 16 v + kind


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bilinear"
    crop_padding: int = 4
    flip: bool = True
    color: ColorAugConfig = field(default_factory=ColorAugConfig)

    @staticmethod
    def from_cfg(cfg: Mapping[str, Any] | None) -> "AugmentConfig":
        """From a `data.augment` section (missing keys: these defaults, the schema's)."""
        cfg = dict(cfg or {})
        color = ColorAugConfig(**{k: float(v) for k, v in dict(cfg.get("color", {})).items()})
        return AugmentConfig(tuple(float(v) for v in cfg.get("crop_scale", (0.08, 1.0))),
                             str(cfg.get("interpolation", "bilinear")), int(cfg.get("crop_padding", 4)),
                             bool(cfg.get("flip", True)), color)


def ssl_view(x: torch.Tensor, u: np.ndarray, aug: AugmentConfig) -> torch.Tensor:
    """Random resized crop + flip + colour jitter/grayscale from uniforms u [B, geometry.CROP_DRAWS + 1 + COLOR_DRAWS]."""
    _, _, h, w = x.shape
    boxes = geometry.crop_boxes(u, h, w, aug.crop_scale)
    wy = geometry.resize_matrix(boxes[:, 0], boxes[:, 2], h, h, aug.interpolation)
    wx = geometry.resize_matrix(boxes[:, 1], boxes[:, 3], w, w, aug.interpolation)
    if aug.flip:
        wx = geometry.flip_rows(wx, u[:, geometry.CROP_DRAWS] < 0.5)
    view = geometry.resample(x, wy, wx).clamp_(0.0, 1.0)  # the cubic filter overshoots a little
    colour = params_from_uniforms(torch.from_numpy(u[:, geometry.CROP_DRAWS + 1:]), aug.color)
    return apply_params(view, colour, aug.color)


def weak_view(x: torch.Tensor, u: np.ndarray, aug: AugmentConfig) -> torch.Tensor:
    """Padded random crop + flip from uniforms u [B, 3]."""
    _, _, h, w = x.shape
    p = aug.crop_padding
    if p == 0 and not aug.flip:
        return x
    top = np.floor(u[:, 0] * (2 * p + 1)).astype(np.int64)
    left = np.floor(u[:, 1] * (2 * p + 1)).astype(np.int64)
    wy, wx = geometry.shift_matrix(top, p, h), geometry.shift_matrix(left, p, w)
    if aug.flip:
        wx = geometry.flip_rows(wx, u[:, 2] < 0.5)
    return geometry.resample(x, wy, wx)


DRAWS = {"ssl": geometry.CROP_DRAWS + 1 + COLOR_DRAWS, "weak": 3}
KIND_CODE = {"ssl": 1, "weak": 2}


def make_views(x: torch.Tensor, index: torch.Tensor | np.ndarray, epoch: int, kinds: Sequence[str],
               aug: AugmentConfig, seed: int) -> list[torch.Tensor]:
    """One view per entry of `kinds` ("ssl" | "weak" | "plain") of the decoded batch `x`."""
    index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index, dtype=np.int64)
    views = []
    for v, kind in enumerate(kinds):
        if kind == "plain":
            views.append(x)
            continue
        u = uniforms(seed, epoch, index, VIEW_STREAMS * v + KIND_CODE[kind], DRAWS[kind])
        views.append(ssl_view(x, u, aug) if kind == "ssl" else weak_view(x, u, aug))
    return views
