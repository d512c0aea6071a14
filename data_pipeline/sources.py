"""Dataset sources: each split is an indexable `ImageSource` of (HWC uint8 RGB image, int label).

Real datasets load through torchvision's own classes, i.e. from their real on-disk formats
(CIFAR python pickles, STL-10 binaries, SVHN .mat files, ImageFolder trees), with torchvision's
MD5 checks left on; `download: true` fetches them. Two sources need no files at all:

* `digits`: scikit-learn's bundled real dataset (1,797 8x8 digits), the embedded default;
* `synthetic`: a procedurally generated labelled image dataset of any size, resolution and
  number of classes (shapes x fill patterns x colour families under random position, scale,
  rotation, background gradient and pixel noise), deterministic from `data.seed`.

Validation split: `data.val_fraction > 0` holds that fraction of the *train* split out as
`val` (deterministic from `data.split_seed`, stratified by label when every sample is
labelled); `train` is then the rest. The test split is never touched.
"""
from __future__ import annotations

import colorsys
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from conf.schema import DATASET_SPLITS, DATASETS

# The dataset names, their splits and fixed class counts are config facts (conf/schema.py).
TORCHVISION_SOURCES = ("cifar10", "cifar100", "stl10", "svhn")
UNLABELED = -1  # label of STL-10's unlabeled images


class DataSourceError(RuntimeError):
    """A dataset cannot be loaded (missing or corrupted files, bad split); the message says why."""


@dataclass
class ImageSource:
    """One split of a dataset: `source[i]` -> (HWC uint8 RGB array, int label).

    `images` is any indexable (a uint8 array or a lazy sequence); `indices` (optional) selects
    and orders the samples of this split out of `images`/`labels`.
    """

    name: str
    split: str
    images: Sequence[np.ndarray] | np.ndarray
    labels: np.ndarray
    classes: list[str]
    resolution: int
    indices: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels) if self.indices is None else len(self.indices)

    def _index(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return int(i if self.indices is None else self.indices[i])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        j = self._index(i)
        return np.ascontiguousarray(self.images[j]), int(self.labels[j])

    def targets(self) -> np.ndarray:
        """The labels of this split, in order (int64)."""
        lab = np.asarray(self.labels, dtype=np.int64)
        return lab if self.indices is None else lab[self.indices]

    def subset(self, positions: np.ndarray, split: str) -> "ImageSource":
        """The samples at `positions` (of this split), as split `split`."""
        positions = np.asarray(positions, dtype=np.int64)
        base = positions if self.indices is None else np.asarray(self.indices)[positions]
        return replace(self, split=split, indices=base)


# --------------------------------------------------------------------------------------------
# Resizing helpers (lazy, per image)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Square `img` to size x size (INTER_AREA when shrinking, bilinear when enlarging)."""
    import cv2

    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


class _Resized(Sequence):
    """A lazy view of square images resized to `size`."""

    def __init__(self, images: Any, size: int) -> None:
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return _resize(np.asarray(self.images[i]), self.size)


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _digits(split: str, resolution: int) -> ImageSource:
    """sklearn digits (1,797 real 8x8 images, 10 classes), nearest-upsampled to RGB `resolution`.

    Fixed stratified 80/20 train/test split (seed 0).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if resolution % 8:
        raise DataSourceError(f"digits resolution must be a multiple of 8, got {resolution}")
    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=labels)
    chosen = np.sort(test_idx if split == "test" else train_idx)
    factor = resolution // 8
    up = images[chosen].repeat(factor, axis=1).repeat(factor, axis=2)
    rgb = np.repeat(up[..., None], 3, axis=3)
    return ImageSource("digits", split, rgb, labels[chosen], [str(d) for d in range(10)], resolution)


# --------------------------------------------------------------------------------------------
# synthetic (procedural, bundled)

SYN_SHAPES = ("disk", "square", "triangle", "cross", "ring", "diamond", "frame", "bar")
SYN_FILLS = ("solid", "hstripes", "vstripes", "checker")
SYN_MAX_HUES = 8
SYN_MAX_CLASSES = len(SYN_SHAPES) * len(SYN_FILLS) * SYN_MAX_HUES
_SYN_SPLIT_CODE = {"train": 0, "test": 1}


def synthetic_class_names(num_classes: int) -> list[str]:
    """Class k = shape (k mod 8), fill pattern ((k div 8) mod 4), colour family (k div 32).

    With <= 32 classes the colour is a nuisance (any hue); beyond that each class also owns a
    band of hues (so colour jitter makes those classes harder, as it should).
    """
    n_hues = max(1, math.ceil(num_classes / (len(SYN_SHAPES) * len(SYN_FILLS))))
    names = []
    for k in range(num_classes):
        shape = SYN_SHAPES[k % len(SYN_SHAPES)]
        fill = SYN_FILLS[(k // len(SYN_SHAPES)) % len(SYN_FILLS)]
        name = f"{shape}/{fill}"
        if n_hues > 1:
            name += f"/hue{k // (len(SYN_SHAPES) * len(SYN_FILLS))}"
        names.append(name)
    return names


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    au, av = np.abs(u), np.abs(v)
    if shape == "disk":
        return u * u + v * v < 0.9
    if shape == "square":
        return np.maximum(au, av) < 0.75
    if shape == "triangle":  # apex up (image y grows downwards)
        return (v < 0.6) & (au * 1.6 < v + 0.9)
    if shape == "cross":
        return ((au < 0.3) & (av < 0.95)) | ((av < 0.3) & (au < 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 < 0.95 ** 2) & (r2 > 0.55 ** 2)
    if shape == "diamond":
        return au + av < 1.0
    if shape == "frame":
        m = np.maximum(au, av)
        return (m < 0.9) & (m > 0.55)
    if shape == "bar":
        return (au < 0.95) & (av < 0.35)
    raise ValueError(shape)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def render_synthetic(label: int, num_classes: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class `label`: HWC uint8, drawn with nuisance variation from `rng`."""
    n_sf = len(SYN_SHAPES) * len(SYN_FILLS)
    n_hues = max(1, math.ceil(num_classes / n_sf))
    shape = SYN_SHAPES[label % len(SYN_SHAPES)]
    fill = SYN_FILLS[(label // len(SYN_SHAPES)) % len(SYN_FILLS)]
    hue_family = label // n_sf
    r = resolution
    coords = (np.arange(r, dtype=np.float32) + 0.5) / r * 2 - 1  # pixel centres in [-1, 1]
    y, x = np.meshgrid(coords, coords, indexing="ij")

    # Nuisances: scale, position (the shape stays mostly inside), rotation, colours, noise.
    scale = rng.uniform(0.35, 0.6)
    cx, cy = rng.uniform(-(1 - scale * 0.8), 1 - scale * 0.8, size=2)
    theta = rng.uniform(-0.45, 0.45)  # +-26 degrees: stripes keep their orientation class
    c, s = math.cos(theta), math.sin(theta)
    dx, dy = x - cx, y - cy
    u = (dx * c + dy * s) / scale
    v = (-dx * s + dy * c) / scale
    mask = _shape_mask(shape, u, v)

    if n_hues > 1:
        hue = (hue_family + rng.uniform(0.15, 0.85)) / n_hues
    else:
        hue = rng.uniform()
    light_fg = rng.uniform() < 0.5
    fg_v = rng.uniform(0.7, 1.0) if light_fg else rng.uniform(0.2, 0.45)
    fg = _hsv(hue, rng.uniform(0.5, 1.0), fg_v)
    fg2 = fg * rng.uniform(0.35, 0.6) if light_fg else np.clip(fg + rng.uniform(0.3, 0.5), 0, 1)
    bg_v = (rng.uniform(0.05, 0.4, size=2) if light_fg else rng.uniform(0.65, 0.95, size=2))
    bg1 = _hsv(rng.uniform(), rng.uniform(0, 0.5), bg_v[0])
    bg2 = _hsv(rng.uniform(), rng.uniform(0, 0.5), bg_v[1])
    phi = rng.uniform(0, 2 * math.pi)
    t = ((x * math.cos(phi) + y * math.sin(phi)) * 0.5 + 0.5)[..., None]
    img = bg1 * (1 - t) + bg2 * t

    width = max(1, r // 16) / (scale * r / 2)  # stripe width: ~2 px at 32x32, in shape units
    if fill == "solid":
        second = np.zeros_like(mask)
    elif fill == "hstripes":
        second = np.floor(v / width).astype(np.int64) % 2 == 1
    elif fill == "vstripes":
        second = np.floor(u / width).astype(np.int64) % 2 == 1
    else:
        second = (np.floor(u / width).astype(np.int64) + np.floor(v / width).astype(np.int64)) % 2 == 1
    img = np.where((mask & ~second)[..., None], fg, img)
    img = np.where((mask & second)[..., None], fg2, img)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.06), size=img.shape)
    return (img.clip(0, 1) * 255 + 0.5).astype(np.uint8)


class _SyntheticImages(Sequence):
    """Images rendered on demand: image i depends only on (seed, split, i)."""

    def __init__(self, labels: np.ndarray, num_classes: int, resolution: int, seed: int, split_code: int) -> None:
        self.labels, self.num_classes, self.resolution = labels, num_classes, resolution
        self.seed, self.split_code = seed, split_code

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        rng = np.random.default_rng([self.seed, self.split_code, int(i)])
        return render_synthetic(int(self.labels[i]), self.num_classes, self.resolution, rng)


def _synthetic(cfg: Mapping[str, Any], split: str) -> ImageSource:
    num_classes = int(cfg.get("num_classes", 10))
    resolution = int(cfg.get("resolution", 32))
    seed = int(cfg.get("seed", 0))
    size = int(cfg.get(f"{split}_size", 5000 if split == "train" else 1000))
    code = _SYN_SPLIT_CODE[split]
    # Balanced classes in a seeded random order.
    labels = np.random.default_rng([seed, code, 2 ** 31]).permutation(np.arange(size) % num_classes)
    images = _SyntheticImages(labels.astype(np.int64), num_classes, resolution, seed, code)
    return ImageSource("synthetic", split, images, labels.astype(np.int64),
                       synthetic_class_names(num_classes), resolution)


# --------------------------------------------------------------------------------------------
# torchvision datasets (real on-disk formats)


def _torchvision(name: str, root: str, split: str, download: bool) -> ImageSource:
    import torchvision.datasets as tvd

    if not root:
        raise DataSourceError(f"data.root is not set; {name} needs the folder holding its files "
                              "(or data.download=true to fetch them there)")
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=(split == "train"), download=download)
            return ImageSource(name, split, ds.data, np.asarray(ds.targets, dtype=np.int64),
                               list(ds.classes), 32)
        if name == "stl10":
            ds = tvd.STL10(root, split=split, download=download)
            classes = list(getattr(ds, "classes", [str(i) for i in range(10)]))
            return ImageSource(name, split, ds.data.transpose(0, 2, 3, 1),
                               np.asarray(ds.labels, dtype=np.int64), classes, 96)
        if name == "svhn":
            ds = tvd.SVHN(root, split=split, download=download)
            return ImageSource(name, split, ds.data.transpose(0, 2, 3, 1), ds.labels.astype(np.int64),
                               [str(d) for d in range(10)], 32)
    except RuntimeError as e:
        folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python",
                  "stl10": "stl10_binary", "svhn": "."}[name]
        raise DataSourceError(
            f"{name} split {split!r}: torchvision could not load it from {os.path.join(root, folder)} "
            f"({e}). The files are missing or fail torchvision's MD5 check; point data.root at the "
            "folder that holds them, or set data.download=true") from e
    raise DataSourceError(f"unknown torchvision dataset {name!r}")


# --------------------------------------------------------------------------------------------
# ImageFolder trees: root/<split>/<class>/<image>


class _FolderImages(Sequence):
    """Decode + resize (shorter side) + centre-crop to a square `resolution`, on demand."""

    def __init__(self, paths: list[str], resolution: int) -> None:
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        w, h = img.size
        r = self.resolution
        scale = r / min(w, h)
        if (w, h) != (r, r):
            nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR if scale > 1 else Image.BOX)
            left, top = (nw - r) // 2, (nh - r) // 2
            img = img.crop((left, top, left + r, top + r))
        return np.asarray(img, dtype=np.uint8)


def _imagefolder(root: str, split: str, resolution: int) -> ImageSource:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not root:
        raise DataSourceError("data.root is not set; imagefolder needs root/<split>/<class>/<images>")
    if resolution <= 0:
        raise DataSourceError("imagefolder needs data.resolution > 0 (images are resized and centre-cropped)")
    train_dir, split_dir = os.path.join(root, "train"), os.path.join(root, split)
    for d in {train_dir, split_dir}:
        if not os.path.isdir(d):
            raise DataSourceError(f"imagefolder: {d} does not exist; expected root/<split>/<class>/<image> "
                                  f"with root={root}")
    # Class indices come from the train tree, so every split uses the same mapping.
    classes, class_to_idx = find_classes(train_dir)
    extra = sorted(set(find_classes(split_dir)[0]) - set(classes))
    if extra:
        raise DataSourceError(f"imagefolder: {split_dir} has class folders not in train: {extra}")
    samples = make_dataset(split_dir, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataSourceError(f"imagefolder: no images under {split_dir}")
    labels = np.asarray([t for _, t in samples], dtype=np.int64)
    return ImageSource("imagefolder", split, _FolderImages([p for p, _ in samples], resolution), labels,
                       list(classes), resolution)


# --------------------------------------------------------------------------------------------
# Validation split and the public entry point


def holdout_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, val), both sorted: a deterministic `val_fraction` hold-out, stratified by
    label when every sample is labelled and each class has >= 2 samples."""
    from sklearn.model_selection import train_test_split

    n = len(labels)
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n_val >= n:
        raise DataSourceError(f"data.val_fraction={val_fraction} leaves {n_val} of {n} images for val")
    pos = np.arange(n)
    labelled = bool(np.all(labels >= 0))
    stratify = None
    if labelled:
        counts = np.bincount(labels)
        counts = counts[counts > 0]
        if counts.min() >= 2 and min(n_val, n - n_val) >= len(counts):
            stratify = labels
    tr, va = train_test_split(pos, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(tr), np.sort(va)


def _full_split(data_cfg: Mapping[str, Any], split: str) -> ImageSource:
    name = data_cfg["name"]
    res = int(data_cfg.get("resolution") or 0)
    if name == "digits":
        return _digits(split, res or 32)
    if name == "synthetic":
        return _synthetic(data_cfg, split)
    if name in TORCHVISION_SOURCES:
        src = _torchvision(name, data_cfg.get("root"), split, bool(data_cfg.get("download", False)))
        if res and res != src.resolution:
            src = replace(src, images=_Resized(src.images, res), resolution=res)
        return src
    if name == "imagefolder":
        src = _imagefolder(data_cfg.get("root"), split, res)
        nc = data_cfg.get("num_classes")
        if nc is not None and int(nc) != src.num_classes:
            raise DataSourceError(f"data.num_classes={nc} but {data_cfg.get('root')}/train has "
                                  f"{src.num_classes} class folders; set data.num_classes={src.num_classes}")
        return src
    raise DataSourceError(f"data.name={name!r} is not known; allowed: {', '.join(DATASETS)}")


def load_source(data_cfg: Mapping[str, Any], split: str) -> ImageSource:
    """Load `split` of the dataset described by `data_cfg` (see module doc for `val`)."""
    name = data_cfg["name"]
    if name not in DATASETS:
        raise DataSourceError(f"data.name={name!r} is not known; allowed: {', '.join(DATASETS)}")
    if split not in DATASET_SPLITS[name]:
        raise DataSourceError(f"{name} has no split {split!r}; allowed: {', '.join(DATASET_SPLITS[name])}")
    vf = float(data_cfg.get("val_fraction") or 0.0)
    if split not in ("train", "val") or (vf == 0 and split == "train"):
        return _full_split(data_cfg, split)
    if vf == 0:  # split == "val"
        if name == "imagefolder" and data_cfg.get("root") and os.path.isdir(os.path.join(data_cfg["root"], "val")):
            return _full_split(data_cfg, "val")  # a tree with its own val folder
        raise DataSourceError("data.split=val needs data.val_fraction > 0 (held out of train)")
    train = _full_split(data_cfg, "train")
    tr, va = holdout_split(train.targets(), vf, int(data_cfg.get("split_seed", 0)))
    return train.subset(va if split == "val" else tr, split)


# --------------------------------------------------------------------------------------------
# Common corruptions: CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich), as published

CORRUPTION_SEVERITIES = 5


def corruption_layout(root: str | os.PathLike, names: Sequence[str]) -> dict[str, Any]:
    """Check the published layout without reading the images: `<name>.npy` uint8 [N, H, W, 3] holding
    5 equal blocks (severity 1 first; N = 50,000 in the published files) and `labels.npy` [N];
    returns {"n": N, "per_severity": N // 5, "resolution": H, "max_label": ...}."""
    root = Path(root)
    try:
        labels = np.load(root / "labels.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataSourceError(f"{root / 'labels.npy'} cannot be read as a .npy array ({e})") from e
    n = int(labels.shape[0]) if labels.ndim == 1 else -1
    if n <= 0 or n % CORRUPTION_SEVERITIES:
        raise DataSourceError(f"{root / 'labels.npy'} has shape {labels.shape}; expected [N] with N a multiple of "
                              f"{CORRUPTION_SEVERITIES} (one block of labels per severity)")
    res = None
    for name in names:
        path = root / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataSourceError(f"{path} cannot be read as a .npy array ({e})") from e
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != n or arr.shape[3] != 3 \
                or arr.shape[1] != arr.shape[2] or (res is not None and arr.shape[1] != res):
            raise DataSourceError(f"{path} is {arr.dtype} {list(arr.shape)}; expected uint8 [{n}, H, H, 3] "
                                  "like labels.npy and the other corruptions")
        res = int(arr.shape[1])
    return {"n": n, "per_severity": n // CORRUPTION_SEVERITIES, "resolution": res,
            "max_label": int(np.max(labels))}


def corruption_split(root: str | os.PathLike, name: str, severity: int,
                     n_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images HWC uint8, labels int64) of one corruption at one severity (1..5): the first n_examples of its
    block (all with None). The file is memory-mapped: only that block is read."""
    root = Path(root)
    labels = np.load(root / "labels.npy", mmap_mode="r")
    block = len(labels) // CORRUPTION_SEVERITIES
    start = (severity - 1) * block
    stop = start + (block if n_examples is None else min(block, n_examples))
    images = np.load(root / f"{name}.npy", mmap_mode="r")
    return np.array(images[start:stop]), np.array(labels[start:stop], dtype=np.int64)  # copies: writable, in memory
