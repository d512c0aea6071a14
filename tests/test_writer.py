"""The .beton writer: atomic writes, reuse, settings-aware names, damage detection, the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.sources import ImageSource, load_source
from data_pipeline.write import (BetonError, beton_path, check_structure, content_settings, ensure_betons,
                                 manifest_path, read_beton_raw, verify_beton, write_beton)

ROOT = Path(__file__).resolve().parent.parent


def _syn(tmp_path: Path, **kw) -> dict:
    cfg = {"name": "synthetic", "num_classes": 4, "resolution": 16, "train_size": 48, "test_size": 16,
           "seed": 0, "val_fraction": 0.25, "split_seed": 0, "beton_dir": str(tmp_path / "b"),
           "write_mode": "raw", "max_resolution": 16, "splits": ["train", "val", "test"]}
    cfg.update(kw)
    return cfg


def _quiet(*_):
    pass


class _Exploding:
    """Images of which number `bad` raises (in the writer's worker process)."""

    def __init__(self, n: int, bad: int) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError("cannot decode image 7")
        return np.zeros((8, 8, 3), np.uint8)


def test_failed_write_leaves_nothing_and_does_not_hang(tmp_path):
    src = ImageSource("x", "train", _Exploding(20, 7), np.zeros(20, np.int64), ["a"], 8)
    path = tmp_path / "x.beton"
    t0 = time.time()
    with pytest.raises(BetonError, match="worker failed"):
        write_beton(src, path)
    assert time.time() - t0 < 60  # FFCV's own writer spins forever here
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [], leftovers


def test_reuse_force_and_settings_aware_names(tmp_path):
    cfg = _syn(tmp_path)
    logs: list[str] = []
    paths = ensure_betons(cfg, ["train", "val", "test"], log=logs.append)
    assert len(logs) == 3 and all("wrote" in l for l in logs)
    stat = {s: (p.stat().st_ino, p.stat().st_mtime_ns) for s, p in paths.items()}
    logs.clear()
    again = ensure_betons(cfg, ["train", "val", "test"], log=logs.append)
    assert again == paths and logs == []  # reused, not rewritten
    assert {s: (p.stat().st_ino, p.stat().st_mtime_ns) for s, p in again.items()} == stat
    m = verify_beton(paths["val"])
    assert (m["count"], m["num_classes"], m["resolution"], m["mode"]) == (12, 4, 16, "raw")
    assert m["label_counts"] == {"0": 3, "1": 3, "2": 3, "3": 3}
    assert m["settings"] == content_settings(cfg, "val") and len(m["sha256"]) == 64
    # write_beton with the same request reuses; force rewrites (a new file, atomically renamed).
    src = load_source(cfg, "test")
    assert write_beton(src, paths["test"], settings=content_settings(cfg, "test"))["reused"] is True
    assert write_beton(src, paths["test"], settings=content_settings(cfg, "test"), force=True)["reused"] is False
    assert paths["test"].stat().st_ino != stat["test"][0]
    # Different content settings -> a different file; the old one is never picked up.
    for change in ({"seed": 1}, {"val_fraction": 0.5}, {"resolution": 8, "max_resolution": 8},
                   {"write_mode": "jpg"}, {"train_size": 52}):
        assert beton_path({**cfg, **change}, "train") != paths["train"], change
    assert beton_path({**cfg, "augment": {"crop_scale": [0.2, 1.0]}}, "train") == paths["train"]
    assert beton_path(cfg, "test") == beton_path({**cfg, "val_fraction": 0.5}, "test")
    # Asked to reuse a file written for other settings: refused, never silently used.
    with pytest.raises(BetonError, match="cannot be reused.*other data settings"):
        write_beton(load_source({**cfg, "seed": 5}, "test"), paths["test"],
                    settings=content_settings({**cfg, "seed": 5}, "test"))


def test_manifest_mismatch_is_rewritten_by_ensure(tmp_path):
    cfg = _syn(tmp_path)
    path = ensure_betons(cfg, ["test"], log=_quiet)["test"]
    mp = manifest_path(path)
    m = json.loads(mp.read_text())
    m["settings"]["seed"] = 99  # e.g. a file copied in from another configuration
    mp.write_text(json.dumps(m))
    logs: list[str] = []
    ensure_betons(cfg, ["test"], log=logs.append)
    assert any("other data settings" in l and "rewriting" in l for l in logs), logs
    assert verify_beton(path, expect=content_settings(cfg, "test"))


def test_truncated_or_modified_files_are_reported(tmp_path):
    from data_pipeline.loaders import build_loader

    cfg = _syn(tmp_path)
    path = ensure_betons(cfg, ["test"], log=_quiet)["test"]
    good = path.read_bytes()
    # Truncated: size differs from the manifest; and structurally (without any manifest).
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(BetonError, match="truncated"):
        verify_beton(path, check_hash=False)
    with pytest.raises(BetonError, match="truncated"):
        build_loader(str(path), "eval", 8)  # the loader checks before FFCV reads anything
    with pytest.raises(BetonError, match="truncated|never finalised"):
        check_structure(path)
    # Same size, different content: caught by the hash.
    mid = len(good) // 2  # inside the data pages
    path.write_bytes(good[:mid] + bytes([good[mid] ^ 0xFF]) + good[mid + 1:])
    verify_beton(path, check_hash=False)
    with pytest.raises(BetonError, match="content hash"):
        verify_beton(path)
    # No manifest: an incomplete write (the manifest is written last).
    path.write_bytes(good)
    manifest_path(path).unlink()
    with pytest.raises(BetonError, match="no manifest"):
        build_loader(str(path), "eval", 8)
    # ensure_betons reports and rewrites a damaged file instead of using it.
    logs: list[str] = []
    ensure_betons(cfg, ["test"], log=logs.append)
    assert any("rewriting" in l for l in logs) and verify_beton(path)


def test_jpg_mode_and_max_resolution(tmp_path):
    cfg = _syn(tmp_path, resolution=32, max_resolution=16, write_mode="jpg", jpeg_quality=95)
    path = ensure_betons(cfg, ["test"], log=_quiet)["test"]
    m = verify_beton(path)
    assert (m["mode"], m["resolution"], m["max_resolution"], m["jpeg_quality"]) == ("jpg", 16, 16, 95)
    with pytest.raises(BetonError, match="raw-mode"):
        read_beton_raw(path)
    raw = ensure_betons(_syn(tmp_path, resolution=32, max_resolution=16), ["test"], log=_quiet)["test"]
    images, _ = read_beton_raw(raw)
    assert images[0].shape == (16, 16, 3)  # stored at max_resolution


def test_cli_writes_reuses_and_forces(tmp_path, capsys):
    from data_pipeline.write import main

    args = ["data=synthetic", f"output_dir={tmp_path}/out", "data.train_size=40", "data.test_size=20",
            "data.resolution=16"]
    # The real entry point once (a fresh interpreter: python -m data_pipeline.write ...).
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run([sys.executable, "-m", "data_pipeline.write", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    lines = [l for l in first.stdout.splitlines() if l.startswith(("train:", "val:", "test:"))]
    assert len(lines) == 3 and "36 images" in lines[0] and "4 images" in lines[1], first.stdout
    assert first.stdout.count("[data] wrote") == 3
    files = sorted((tmp_path / "out" / "data").glob("*.beton"))
    assert len(files) == 3
    mtimes = [f.stat().st_mtime_ns for f in files]
    # The same main() in-process: reuse, force, a bad value.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[data] wrote" not in out and out.count(" images, ") == 3
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert main(args + ["force=true"]) == 0
    assert capsys.readouterr().out.count("[data] wrote") == 3
    assert main(args + ["data.write_mode=png"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "config error: data.write_mode='png' is invalid: allowed: raw, jpg, smart"]
    assert main(args + ["force=maybe"]) == 2
