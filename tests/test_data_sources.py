"""Every source, read through its real loading code, and written to .beton and read back.

The torchvision datasets are tiny files in the real on-disk formats (tests/dataset_files.py),
read by torchvision's own classes with their MD5 check on (the fixtures' MD5s registered).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import composed
import dataset_files as df
from conf import ConfigError, validate
from data_pipeline.sources import (DataSourceError, holdout_split, load_source, render_synthetic,
                                   synthetic_class_names)
from data_pipeline.write import ensure_betons, read_beton_raw, verify_beton


def _cfg(name: str, tmp_path: Path, **kw) -> dict:
    cfg = {"name": name, "root": str(tmp_path / "raw"), "download": False, "val_fraction": 0.0,
           "split_seed": 0, "beton_dir": str(tmp_path / "betons"), "write_mode": "raw",
           "resolution": {"stl10": 96, "imagefolder": 16}.get(name, 32), "max_resolution": None}
    cfg.update(kw)
    return cfg


def _assert_roundtrip(cfg: dict, splits: list[str], expected: dict) -> None:
    """source == fixture arrays; beton (raw) == source: count, labels, every pixel."""
    paths = ensure_betons(cfg, splits, log=lambda *_: None)
    for split in splits:
        src = load_source(cfg, split)
        if split in expected:
            x, y = expected[split]
            assert len(src) == len(y)
            np.testing.assert_array_equal(src.targets(), y)
            for i in range(len(src)):
                np.testing.assert_array_equal(src[i][0], x[i])
        manifest = verify_beton(paths[split])
        assert manifest["count"] == len(src) and manifest["split"] == split
        assert manifest["source"] == cfg["name"] and manifest["mode"] == "raw"
        images, labels = read_beton_raw(paths[split])
        np.testing.assert_array_equal(labels, src.targets())
        for i in range(len(src)):
            np.testing.assert_array_equal(images[i], src[i][0])


def test_cifar10_real_format_roundtrip(tmp_path, monkeypatch):
    files = df.write_cifar10(tmp_path / "raw")
    df.register_md5(monkeypatch, "cifar10", tmp_path / "raw")
    cfg = _cfg("cifar10", tmp_path)
    _assert_roundtrip(cfg, ["train", "test"], files)
    assert load_source(cfg, "train").classes == df.CIFAR10_CLASSES
    assert verify_beton(ensure_betons(cfg, ["test"])["test"])["classes"] == df.CIFAR10_CLASSES


def test_cifar100_real_format_roundtrip(tmp_path, monkeypatch):
    files = df.write_cifar100(tmp_path / "raw")
    df.register_md5(monkeypatch, "cifar100", tmp_path / "raw")
    cfg = _cfg("cifar100", tmp_path)
    _assert_roundtrip(cfg, ["train", "test"], files)
    src = load_source(cfg, "test")
    assert src.num_classes == 100 and src.classes[7] == "class_007"


def test_stl10_real_format_all_splits(tmp_path, monkeypatch):
    files = df.write_stl10(tmp_path / "raw")
    df.register_md5(monkeypatch, "stl10", tmp_path / "raw")
    cfg = _cfg("stl10", tmp_path)
    _assert_roundtrip(cfg, ["train", "test", "unlabeled"], files)
    both = load_source(cfg, "train+unlabeled")
    assert len(both) == 20 + 8 and (both.targets()[20:] == -1).all()
    assert load_source(cfg, "train").classes[2] == "car"
    # Downsampled STL-10 (resolution 48): every image resized on the fly.
    small = load_source(_cfg("stl10", tmp_path, resolution=48), "test")
    assert small.resolution == 48 and small[0][0].shape == (48, 48, 3)


def test_svhn_real_format_roundtrip(tmp_path, monkeypatch):
    files = df.write_svhn(tmp_path / "raw")
    df.register_md5(monkeypatch, "svhn", tmp_path / "raw")
    cfg = _cfg("svhn", tmp_path)
    _assert_roundtrip(cfg, ["train", "test"], files)  # includes the on-disk 10 -> label 0 mapping
    assert (load_source(cfg, "train").targets()[:2] == 0).all()


def test_imagefolder_roundtrip_resize_and_class_mapping(tmp_path):
    files = df.write_imagefolder(tmp_path / "raw")
    cfg = _cfg("imagefolder", tmp_path, num_classes=3)
    train, test = load_source(cfg, "train"), load_source(cfg, "test")
    assert train.classes == test.classes == ["a", "b", "c"]
    np.testing.assert_array_equal(train.targets(), files["train"][1])
    np.testing.assert_array_equal(test.targets(), files["test"][1])  # 'c' stays 2 without 'b'
    assert all(train[i][0].shape == (16, 16, 3) for i in range(len(train)))
    from PIL import Image
    np.testing.assert_array_equal(train[0][0], np.asarray(Image.open(files["train"][0][0])))  # 16x16 kept
    _assert_roundtrip(cfg, ["train", "test"], {})
    with pytest.raises(DataSourceError, match="num_classes=5 but .* 3 class folders"):
        load_source({**cfg, "num_classes": 5}, "train")


def test_torchvision_md5_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    df.write_cifar10(tmp_path / "raw")
    # torchvision's real MD5 table is in force: the fixture files fail it.
    with pytest.raises(DataSourceError, match=r"cifar10 split 'train'.*MD5.*data.download=true"):
        load_source(_cfg("cifar10", tmp_path), "train")
    df.register_md5(monkeypatch, "cifar10", tmp_path / "raw")
    load_source(_cfg("cifar10", tmp_path), "train")
    batch = tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10])  # corrupted after registration
    with pytest.raises(DataSourceError, match="MD5"):
        load_source(_cfg("cifar10", tmp_path), "train")
    with pytest.raises(DataSourceError, match="data.root is not set"):
        load_source(_cfg("cifar10", tmp_path, root=None), "train")


def test_digits_splits():
    cfg = {"name": "digits", "resolution": 32, "val_fraction": 0.1}
    tr, va, te = (load_source(cfg, s) for s in ("train", "val", "test"))
    assert (len(tr), len(va), len(te)) == (1293, 144, 360)
    assert len(load_source({**cfg, "val_fraction": 0.0}, "train")) == 1437
    assert tr[0][0].shape == (32, 32, 3) and tr[0][0].dtype == np.uint8


def test_val_split_is_stratified_disjoint_deterministic(tmp_path):
    cfg = {"name": "synthetic", "num_classes": 5, "resolution": 16, "train_size": 200, "test_size": 20,
           "seed": 3, "val_fraction": 0.2}
    full = load_source({**cfg, "val_fraction": 0.0}, "train")
    tr, va = load_source(cfg, "train"), load_source(cfg, "val")
    assert (len(tr), len(va)) == (160, 40)
    assert np.bincount(va.targets()).tolist() == [8] * 5  # stratified
    assert set(tr.indices).isdisjoint(va.indices) and len(set(tr.indices) | set(va.indices)) == 200
    np.testing.assert_array_equal(load_source(cfg, "val").indices, va.indices)
    np.testing.assert_array_equal(va[3][0], full[int(va.indices[3])][0])
    other = load_source({**cfg, "split_seed": 1}, "val")
    assert not np.array_equal(other.indices, va.indices)
    # Unlabelled samples (STL-10 style): plain random hold-out.
    t2, v2 = holdout_split(np.full(50, -1), 0.2, 0)
    assert len(v2) == 10 and len(t2) == 40 and set(t2).isdisjoint(v2)
    with pytest.raises(DataSourceError, match="val_fraction"):
        load_source({**cfg, "val_fraction": 0.0}, "val")


def test_synthetic_deterministic_any_size_resolution_classes():
    cfg = {"name": "synthetic", "num_classes": 40, "resolution": 24, "train_size": 120, "test_size": 40,
           "seed": 7}
    a, b = load_source(cfg, "train"), load_source(cfg, "train")
    assert len(a) == 120 and a[5][0].shape == (24, 24, 3) and a[5][0].dtype == np.uint8
    np.testing.assert_array_equal(a[5][0], b[5][0])
    np.testing.assert_array_equal(a.targets(), b.targets())
    assert np.bincount(a.targets(), minlength=40).tolist() == [3] * 40  # balanced
    assert a.num_classes == 40 and a.classes[32].endswith("/hue1")
    c = load_source({**cfg, "seed": 8}, "train")
    assert not np.array_equal(a[5][0], c[5][0])
    test = load_source(cfg, "test")
    assert not np.array_equal(test[0][0], a[0][0])
    assert len(set(synthetic_class_names(256))) == 256
    big = render_synthetic(3, 10, 96, np.random.default_rng(0))
    assert big.shape == (96, 96, 3)


def test_synthetic_classes_are_learnable_by_a_cnn():
    """A tiny CNN separates the 8 shape classes far above chance in a few seconds."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    cfg = {"name": "synthetic", "num_classes": 8, "resolution": 16, "train_size": 1200, "test_size": 400,
           "seed": 0}

    def tensors(split):
        s = load_source(cfg, split)
        x = torch.from_numpy(np.stack([s[i][0] for i in range(len(s))])).permute(0, 3, 1, 2).float() / 255
        return x, torch.from_numpy(s.targets())

    xtr, ytr = tensors("train")
    xte, yte = tensors("test")
    net = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(24, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(48, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                        nn.Linear(64, 8))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(12):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(xte).argmax(1) == yte).float().mean().item()
    print(f"synthetic 8-class test accuracy: {acc:.3f}")
    assert acc > 0.6, acc  # chance: 0.125


@pytest.mark.parametrize("change, key", [
    ({"name": "mnist"}, "data.name"),
    ({"val_fraction": 1.0}, "data.val_fraction"),
    ({"splits": ["train", "extra"]}, "data.splits"),
    ({"splits": ["train", "val"], "val_fraction": 0.0}, "data.splits"),
    ({"write_mode": "png"}, "data.write_mode"),
    ({"resolution": 4}, "data.resolution"),
    ({"num_classes": 1}, "data.num_classes"),
    ({"train_size": 3}, "data.train_size"),
])
def test_data_config_problems_are_named(change, key):
    cfg = composed("data=synthetic", "data.train_size=100", "data.test_size=20")
    validate(cfg)
    cfg["data"].update(change)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(key + "="), info.value
