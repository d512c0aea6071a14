"""Dataset sources: each yields (HWC uint8 RGB image, int label) pairs in a fixed order.

Real datasets load through torchvision's own classes (their on-disk formats); `digits` is
scikit-learn's bundled real dataset (no download), the embedded default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np


@dataclass
class ImageSource:
    """An indexable image dataset: `images[i]` HWC uint8, `labels[i]` int."""

    name: str
    split: str
    images: Sequence[np.ndarray] | np.ndarray
    labels: np.ndarray
    num_classes: int
    resolution: int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return np.ascontiguousarray(self.images[i]), int(self.labels[i])


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _digits_split(split: str, resolution: int, val_fraction: float) -> ImageSource:
    """sklearn digits (1,797 real 8x8 images, 10 classes), nearest-upsampled to RGB `resolution`.

    Fixed stratified split: 20% test; `val` is carved out of the training part when asked.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    labels = digits.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=labels)
    if split == "test":
        chosen = test_idx
    else:
        if val_fraction > 0:
            tr, va = train_test_split(train_idx, test_size=val_fraction, random_state=DIGITS_SPLIT_SEED,
                                      stratify=labels[train_idx])
            chosen = va if split == "val" else tr
        elif split == "val":
            raise ValueError("data.split=val needs data.val_fraction > 0")
        else:
            chosen = train_idx
    chosen = np.sort(chosen)
    factor = resolution // 8
    if resolution % 8:
        raise ValueError(f"digits resolution must be a multiple of 8, got {resolution}")
    up = images[chosen].repeat(factor, axis=1).repeat(factor, axis=2)
    rgb = np.repeat(up[..., None], 3, axis=3)
    return ImageSource("digits", split, rgb, labels[chosen], 10, resolution)


def _torchvision_split(name: str, root: str, split: str, download: bool) -> ImageSource:
    import torchvision.datasets as tvd

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        if split not in ("train", "test"):
            raise ValueError(f"{name} splits are train/test, got {split!r}")
        ds = cls(root, train=(split == "train"), download=download)
        return ImageSource(name, split, ds.data, np.asarray(ds.targets, dtype=np.int64),
                           len(ds.classes), 32)
    if name == "stl10":
        ds = tvd.STL10(root, split=split, download=download)
        return ImageSource(name, split, ds.data.transpose(0, 2, 3, 1), ds.labels.astype(np.int64), 10, 96)
    if name == "svhn":
        ds = tvd.SVHN(root, split=split, download=download)
        return ImageSource(name, split, ds.data.transpose(0, 2, 3, 1), ds.labels.astype(np.int64), 10, 32)
    raise ValueError(f"unknown torchvision dataset {name!r}")


def _imagefolder_split(root: str, split: str, resolution: int) -> ImageSource:
    import os

    from PIL import Image
    import torchvision.datasets as tvd

    ds = tvd.ImageFolder(os.path.join(root, split))

    class _Lazy(Sequence):
        def __len__(self) -> int:
            return len(ds.samples)

        def __getitem__(self, i: int) -> np.ndarray:
            img = Image.open(ds.samples[i][0]).convert("RGB")
            if resolution and img.size != (resolution, resolution):
                img = img.resize((resolution, resolution), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)

    labels = np.asarray([t for _, t in ds.samples], dtype=np.int64)
    return ImageSource("imagefolder", split, _Lazy(), labels, len(ds.classes), resolution)


SOURCES: dict[str, Callable[..., ImageSource]] = {}
SOURCE_NAMES = ("digits", "cifar10", "cifar100", "stl10", "svhn", "imagefolder")


def load_source(data_cfg: Mapping[str, Any], split: str) -> ImageSource:
    """Load `split` of the dataset named by `data_cfg['name']`."""
    name = data_cfg["name"]
    if name == "digits":
        return _digits_split(split, int(data_cfg.get("resolution", 32)), float(data_cfg.get("val_fraction", 0.0)))
    if name in ("cifar10", "cifar100", "stl10", "svhn"):
        return _torchvision_split(name, data_cfg["root"], split, bool(data_cfg.get("download", False)))
    if name == "imagefolder":
        return _imagefolder_split(data_cfg["root"], split, int(data_cfg.get("resolution", 0)))
    raise ValueError(f"data.name={name!r} is not known; allowed: {', '.join(SOURCE_NAMES)}")
