"""Per-sample crops, resizes, padding and flips of a batch, as two small matrices per sample.

Every geometric augmentation of one sample maps output rows to input rows and output columns to
input columns independently: `out = Wy @ image @ Wx^T` per channel, with Wy [H_out, H_in] and
Wx [W_out, W_in]. A random resized crop puts the resampling filter's taps of the crop box in
them, a padded random crop puts ones at the shifted positions (zero rows for the padding), a
horizontal flip reverses Wx's rows. The parameters come from uniforms in [0, 1) (data_pipeline.seeded);
the matrices are built on the CPU and applied to the whole batch with two batched matmuls on the
batch's device.

Semantics follow torchvision: `RandomResizedCrop.get_params` (10 tries of area in `scale` and
log-uniform aspect ratio in `ratio`, then the centre-crop fallback), `RandomCrop(padding=p)` with
zero fill, `RandomHorizontalFlip(0.5)`. Resampling uses PIL's filters, which the papers' code runs
on PIL images: the triangle filter (bilinear) or Keys' cubic with a = -0.5 (bicubic), taps inside
the crop only, weights renormalised at the crop's border. Crops here are never larger than the
output (the output is the stored resolution), so no anti-aliasing is involved.
"""
from __future__ import annotations

import math

import numpy as np
import torch

CROPS_TRIES = 10
CROP_DRAWS = 4 * CROPS_TRIES  # area, log aspect ratio, top, left per try
RATIO = (3 / 4, 4 / 3)


def crop_boxes(u: np.ndarray, height: int, width: int, scale: tuple[float, float],
               ratio: tuple[float, float] = RATIO) -> np.ndarray:
    """int64 [B, 4] (top, left, h, w) from uniforms u [B, CROP_DRAWS], as RandomResizedCrop.get_params."""
    b = u.shape[0]
    u = u[:, :CROP_DRAWS].reshape(b, CROPS_TRIES, 4)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + (hi - lo) * u[..., 1])
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # Python's round: half to even, like np.rint
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = np.floor(u[..., 2] * (height - h + 1)).astype(np.int64)
    left = np.floor(u[..., 3] * (width - w + 1)).astype(np.int64)
    out = np.empty((b, 4), dtype=np.int64)
    out[:] = _centre_crop(height, width, ratio)
    found = ok.any(axis=1)
    first = ok.argmax(axis=1)
    rows = np.nonzero(found)[0]
    t = first[rows]
    out[rows] = np.stack([top[rows, t], left[rows, t], h[rows, t], w[rows, t]], axis=1)
    return out


def _centre_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.clip(1.0 - np.abs(x), 0.0, None)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


FILTERS = {"bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0)}


def resize_matrix(start: np.ndarray, length: np.ndarray, size_in: int, size_out: int,
                  interpolation: str = "bilinear") -> np.ndarray:
    """float32 [B, size_out, size_in]: resample [start, start + length) of each row to size_out (PIL)."""
    filt, support = FILTERS[interpolation]
    scale = (length / size_out).astype(np.float64)[:, None, None]
    stretch = np.maximum(scale, 1.0)                                         # > 1 only when shrinking
    centre = (np.arange(size_out)[None, :, None] + 0.5) * scale              # in crop pixel units
    k = np.arange(size_in)[None, None, :] - start[:, None, None]             # input pixel, crop-relative
    t = (k + 0.5 - centre) / stretch
    weights = filt(t) * ((k >= 0) & (k < length[:, None, None])) * (np.abs(t) < support)
    return (weights / weights.sum(axis=2, keepdims=True)).astype(np.float32)


def shift_matrix(offset: np.ndarray, padding: int, size: int) -> np.ndarray:
    """float32 [B, size, size]: output i reads input i + offset - padding (zero outside): a padded crop."""
    src = np.arange(size)[None, :] + offset[:, None] - padding
    m = (np.arange(size)[None, None, :] == src[:, :, None]).astype(np.float32)
    return m


def flip_rows(m: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Reverse the output order of the samples whose `flip` is True (a horizontal flip for Wx)."""
    m = m.copy()
    m[flip] = m[flip, ::-1]
    return m


def resample(x: torch.Tensor, wy: np.ndarray, wx: np.ndarray) -> torch.Tensor:
    """out[b, c] = wy[b] @ x[b, c] @ wx[b]^T, on x's device and dtype."""
    wy_t = torch.from_numpy(wy).to(device=x.device, dtype=x.dtype, non_blocking=True)
    wx_t = torch.from_numpy(wx).to(device=x.device, dtype=x.dtype, non_blocking=True)
    return torch.matmul(wy_t[:, None], torch.matmul(x, wx_t.transpose(1, 2)[:, None]))
