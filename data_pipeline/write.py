"""Convert a dataset source to an FFCV `.beton` file, atomically, with a manifest beside it.

    python -m data_pipeline.write data=digits            # writes every split of the data config
    python -m data_pipeline.write data=cifar10 data.root=/datasets/cifar10 data.download=true

A complete existing file whose manifest matches the request is reused, not rewritten (unless
`force=true`); a file whose size or hash does not match its manifest is reported, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from data_pipeline.sources import ImageSource, load_source

MANIFEST_SUFFIX = ".manifest.json"


class BetonError(RuntimeError):
    """A `.beton` file is missing, truncated, or does not match its manifest."""


def manifest_path(beton: str | os.PathLike) -> Path:
    return Path(str(beton) + MANIFEST_SUFFIX)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _request(source: ImageSource, mode: str, max_resolution: int, jpeg_quality: int) -> dict[str, Any]:
    return {"source": source.name, "split": source.split, "count": len(source),
            "num_classes": source.num_classes, "resolution": source.resolution,
            "mode": mode, "max_resolution": max_resolution, "jpeg_quality": jpeg_quality}


def verify_beton(path: str | os.PathLike, check_hash: bool = True) -> dict[str, Any]:
    """Return the manifest of a complete `.beton`, or raise BetonError saying what is wrong."""
    path = Path(path)
    mpath = manifest_path(path)
    if not path.exists():
        raise BetonError(f"{path} does not exist; write it with `python -m data_pipeline.write`")
    if not mpath.exists():
        raise BetonError(f"{path} has no manifest {mpath.name}: it may be incomplete; rewrite it "
                         "with `python -m data_pipeline.write force=true`")
    manifest = json.loads(mpath.read_text())
    size = path.stat().st_size
    if size != manifest["bytes"]:
        raise BetonError(f"{path} is {size} bytes but its manifest says {manifest['bytes']}: the file is "
                         "truncated or was replaced; rewrite it with force=true")
    if check_hash and _file_sha256(path) != manifest["sha256"]:
        raise BetonError(f"{path} content hash does not match its manifest; rewrite it with force=true")
    return manifest


def write_beton(source: ImageSource, path: str | os.PathLike, mode: str = "raw",
                max_resolution: int | None = None, jpeg_quality: int = 90,
                num_workers: int = 1, force: bool = False) -> dict[str, Any]:
    """Write `source` to `path` (temp file + rename) and its manifest; reuse a matching file."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if mode not in ("raw", "jpg", "smart"):
        raise ValueError(f"beton mode must be raw, jpg or smart, got {mode!r}")
    path = Path(path).absolute()
    max_res = int(max_resolution or source.resolution)
    request = _request(source, mode, max_res, jpeg_quality)
    if path.exists() and not force:
        try:
            manifest = verify_beton(path, check_hash=False)
            if all(manifest.get(k) == v for k, v in request.items()):
                return manifest
        except BetonError:
            pass
        raise BetonError(f"{path} exists but does not match the requested {request}; "
                         "pass force=true to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = DatasetWriter(tmp, {
            "image": RGBImageField(write_mode=mode, max_resolution=max_res, jpeg_quality=jpeg_quality),
            "label": IntField(),
        }, num_workers=num_workers)
        writer.from_indexed_dataset(source)
        manifest = {**request, "bytes": os.path.getsize(tmp), "sha256": _file_sha256(Path(tmp)),
                    "classes": list(range(source.num_classes)), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        mtmp = str(manifest_path(path)) + ".tmp"
        Path(mtmp).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, path)
        os.replace(mtmp, manifest_path(path))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return manifest


def beton_path(data_cfg: Mapping[str, Any], split: str) -> Path:
    """`<beton_dir>/<name>_<split>.beton`; a held-out validation fraction is part of the name,
    since it changes what the train split contains."""
    vf = float(data_cfg.get("val_fraction") or 0.0)
    suffix = f"_val{vf:g}" if vf > 0 and split in ("train", "val") else ""
    return Path(data_cfg["beton_dir"]).absolute() / f"{data_cfg['name']}_{split}{suffix}.beton"


def ensure_betons(data_cfg: Mapping[str, Any], splits: list[str], force: bool = False,
                  log=print) -> dict[str, Path]:
    """Write (or reuse) one `.beton` per split of `data_cfg`; return split -> path."""
    out = {}
    for split in splits:
        path = beton_path(data_cfg, split)
        if path.exists() and not force:
            try:
                verify_beton(path, check_hash=False)
                out[split] = path
                continue
            except BetonError as e:
                log(f"[data] {e}; rewriting")
                force_split = True
        else:
            force_split = force
        t0 = time.time()
        source = load_source(data_cfg, split)
        write_beton(source, path, data_cfg.get("write_mode", "raw"), data_cfg.get("max_resolution"),
                    force=force_split)
        log(f"[data] wrote {path} ({len(source)} images, {time.time() - t0:.1f}s)")
        out[split] = path
    return out


def main(argv: list[str] | None = None) -> int:
    from trainer.config import compose, ConfigError

    args = list(sys.argv[1:] if argv is None else argv)
    force = any(a in ("force=true", "force=True") for a in args)
    args = [a for a in args if not a.startswith("force=")]
    try:
        cfg = compose(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data_cfg = cfg["data"]
    splits = list(data_cfg["splits"])
    ensure_betons(data_cfg, splits, force=force)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
