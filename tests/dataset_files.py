"""Tiny datasets written in each dataset's REAL on-disk format, for tests without downloads.

CIFAR-10/100: python pickle batches + meta, exactly as in cifar-*-python.tar.gz;
STL-10: the binary stl10_binary/*.bin files (column-major 3x96x96 images, 1-based labels);
SVHN: {split}_32x32.mat written with scipy.io.savemat (X: 32x32x3xN, y: Nx1 with 10 for "0");
ImageFolder: PNG files under root/<split>/<class>/;
CIFAR-10-C / CIFAR-100-C: <corruption>.npy (5 severities x n images, uint8 NHWC) and labels.npy.

torchvision checks the MD5 of every file against its own table (the real datasets' hashes), and
these files cannot match it. `register_md5` puts the fixtures' real MD5s into torchvision's
tables (monkeypatched for one test), so torchvision's own integrity check runs and passes on them.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def md5(path: str | os.PathLike) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """HWC images -> CIFAR rows: 1024 red, 1024 green, 1024 blue values, row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    train_x, train_y = [], []
    for b in range(1, 6):
        x = _images(rng, per_batch, 32)
        y = rng.integers(0, 10, size=per_batch).tolist()
        entry = {"batch_label": f"training batch {b} of 5", "labels": y, "data": _cifar_rows(x),
                 "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)]}
        (d / f"data_batch_{b}").write_bytes(pickle.dumps(entry, protocol=2))
        train_x.append(x)
        train_y += y
    x = _images(rng, n_test, 32)
    y = rng.integers(0, 10, size=n_test).tolist()
    (d / "test_batch").write_bytes(pickle.dumps(
        {"batch_label": "testing batch 1 of 1", "labels": y, "data": _cifar_rows(x),
         "filenames": [f"t_{i}.png" for i in range(n_test)]}, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps(
        {"num_cases_per_batch": per_batch, "label_names": CIFAR10_CLASSES, "num_vis": 3072}, protocol=2))
    return {"train": (np.concatenate(train_x), np.asarray(train_y)), "test": (x, np.asarray(y)),
            "classes": CIFAR10_CLASSES}


def write_cifar100(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    classes = [f"class_{i:03d}" for i in range(100)]
    out = {"classes": classes}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 32)
        fine = rng.integers(0, 100, size=n).tolist()
        (d / split).write_bytes(pickle.dumps(
            {"filenames": [f"{split}_{i}.png" for i in range(n)], "batch_label": f"{split} batch",
             "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": _cifar_rows(x)}, protocol=2))
        out[split] = (x, np.asarray(fine))
    (d / "meta").write_bytes(pickle.dumps(
        {"fine_label_names": classes, "coarse_label_names": [f"super_{i}" for i in range(20)]}, protocol=2))
    return out


def write_stl10(root: Path, n_train: int = 20, n_test: int = 10, n_unlabeled: int = 8, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    d = Path(root) / "stl10_binary"
    d.mkdir(parents=True, exist_ok=True)
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

    def save_x(name: str, x: np.ndarray) -> None:
        # STL-10 stores each image as 3 column-major 96x96 planes: index [n, c, col, row].
        (d / name).write_bytes(np.ascontiguousarray(x.transpose(0, 3, 2, 1)).tobytes())

    out = {"classes": classes}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 96)
        y = rng.integers(0, 10, size=n)
        save_x(f"{split}_X.bin", x)
        (d / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())  # 1-based on disk
        out[split] = (x, y)
    x = _images(rng, n_unlabeled, 96)
    save_x("unlabeled_X.bin", x)
    out["unlabeled"] = (x, np.full(n_unlabeled, -1))
    (d / "class_names.txt").write_text("\n".join(classes) + "\n")
    return out


def write_svhn(root: Path, n_train: int = 30, n_test: int = 12, seed: int = 3) -> dict:
    import scipy.io

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 32)
        digits = rng.integers(0, 10, size=n)
        digits[:2] = 0  # make sure the "0 is stored as 10" convention is exercised
        on_disk = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(Path(root) / f"{split}_32x32.mat"), {"X": x.transpose(1, 2, 3, 0), "y": on_disk})
        out[split] = (x, digits)
    return out


def write_imagefolder(root: Path, seed: int = 4) -> dict:
    """3 classes; train images of varied sizes; test lacks class 'b' (mapping must still hold)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    layout = {"train": {"a": 4, "b": 3, "c": 5}, "test": {"a": 2, "c": 3}}
    sizes = [(16, 16), (20, 16), (16, 24), (40, 40)]
    out = {}
    for split, counts in layout.items():
        files, labels = [], []
        for ci, cls in enumerate(["a", "b", "c"]):
            for i in range(counts.get(cls, 0)):
                w, h = sizes[i % len(sizes)]
                img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                p = Path(root) / split / cls / f"{i:03d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(p)
                files.append(p)
                labels.append(ci)
        out[split] = (files, np.asarray(labels))
    out["classes"] = ["a", "b", "c"]
    return out


def write_cifar_c(root: Path, names: list[str], per_severity: int = 4, num_classes: int = 10,
                  seed: int = 5, base: np.ndarray | None = None) -> dict:
    """CIFAR-10-C / CIFAR-100-C as published: `<name>.npy` uint8 [5 * per_severity, 32, 32, 3] (severity 1
    first, the same test images in each block) and `labels.npy` [5 * per_severity]. `base`: the clean
    images to corrupt (else random ones); severity s adds uniform noise of amplitude 25 * s."""
    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    clean = base if base is not None else _images(rng, per_severity, 32)
    labels = rng.integers(0, num_classes, size=per_severity)
    out = {"labels": np.tile(labels, 5)}
    np.save(Path(root) / "labels.npy", out["labels"].astype(np.uint8))  # the published file is uint8 too
    for name in names:
        blocks = [np.clip(clean.astype(np.int16) + rng.integers(-25 * s, 25 * s + 1, size=clean.shape), 0, 255)
                  for s in range(1, 6)]
        out[name] = np.concatenate(blocks).astype(np.uint8)
        np.save(Path(root) / f"{name}.npy", out[name])
    return out


def register_md5(monkeypatch, name: str, root: Path) -> None:
    """Point torchvision's MD5 table for `name` at the fixture files under `root`."""
    import torchvision.datasets as tvd

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        base = Path(root) / cls.base_folder
        for attr in ("train_list", "test_list"):
            monkeypatch.setattr(cls, attr, [[f, md5(base / f)] for f, _ in getattr(cls, attr)])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(base / cls.meta["filename"])})
    elif name == "stl10":
        base = Path(root) / tvd.STL10.base_folder
        for attr in ("train_list", "test_list"):
            monkeypatch.setattr(tvd.STL10, attr, [[f, md5(base / f)] for f, _ in getattr(tvd.STL10, attr)])
    elif name == "svhn":
        table = {k: list(v) for k, v in tvd.SVHN.split_list.items()}
        for split, entry in table.items():
            path = Path(root) / entry[1]
            if path.exists():
                entry[2] = md5(path)
        monkeypatch.setattr(tvd.SVHN, "split_list", table)
    else:
        raise ValueError(name)
