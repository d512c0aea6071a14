"""Convert a dataset source to FFCV `.beton` files, atomically, each with a manifest beside it.

    python -m data_pipeline.write data=digits                 # every split in data.splits
    python -m data_pipeline.write data=cifar10 data.root=/datasets/cifar10 data.download=true
    python -m data_pipeline.write data=synthetic data.train_size=50000 force=true

File names: `<beton_dir>/<name>_<split>[_val<fraction>]_<settings hash>.beton`. The hash covers
every data setting that changes the file's content (source, split, resolution, write mode,
validation hold-out, synthetic parameters, ...), so a beton written for other settings is never
picked up by mistake. The manifest `<file>.manifest.json` records source, split, count, classes,
label counts, resolution, mode, the settings and the SHA-256 of the file.

Writes go to a temporary file in the same folder and are renamed into place (atomic on POSIX);
the manifest is written last, so a beton without a manifest is an incomplete file. A process
lock serialises writers of the same file. An existing complete file whose manifest matches is
reused unless `force=true`; a truncated, replaced or mismatched file is reported (BetonError),
never used.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from conf import ConfigError, compose
from conf.cli import CommandLine, cli_main
from data_pipeline import keep_torch_threads
from data_pipeline.sources import ImageSource, load_source

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_VERSION = 2


class BetonError(RuntimeError):
    """A `.beton` file is missing, truncated, or does not match its manifest or the request."""


def manifest_path(beton: str | os.PathLike) -> Path:
    return Path(str(beton) + MANIFEST_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# What a beton contains: settings -> file name


def content_settings(data_cfg: Mapping[str, Any], split: str) -> dict[str, Any]:
    """Every data setting that changes the content of `split`'s beton (and nothing else)."""
    name = data_cfg["name"]
    mode = data_cfg.get("write_mode", "raw")
    res = int(data_cfg.get("resolution") or 0)
    s: dict[str, Any] = {"source": name, "split": split, "resolution": res, "write_mode": mode,
                         "max_resolution": int(data_cfg.get("max_resolution") or res)}
    if mode != "raw":
        s["jpeg_quality"] = int(data_cfg.get("jpeg_quality", 90))
    vf = float(data_cfg.get("val_fraction") or 0.0)
    if split in ("train", "val") and vf > 0:
        s["val_fraction"] = vf
        s["split_seed"] = int(data_cfg.get("split_seed", 0))
    if name == "synthetic":
        s["num_classes"] = int(data_cfg["num_classes"])
        s["seed"] = int(data_cfg.get("seed", 0))
        base = "train" if split == "val" else split
        s["size"] = int(data_cfg.get(f"{base}_size", 5000 if base == "train" else 1000))
    if name == "imagefolder":  # the folder *is* the dataset's identity
        s["root"] = str(Path(data_cfg["root"]).expanduser().absolute()) if data_cfg.get("root") else None
    return s


def settings_hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def beton_path(data_cfg: Mapping[str, Any], split: str) -> Path:
    """`<beton_dir>/<name>_<split>[_val<f>]_<hash>.beton` (see module doc)."""
    settings = content_settings(data_cfg, split)
    vf = settings.get("val_fraction")
    suffix = f"_val{vf:g}" if vf else ""
    return (Path(data_cfg["beton_dir"]).expanduser().absolute()
            / f"{data_cfg['name']}_{split}{suffix}_{settings_hash(settings)}.beton")


# --------------------------------------------------------------------------------------------
# Checking a file


def check_structure(path: str | os.PathLike) -> dict[str, int]:
    """Check that a file is a whole FFCV beton (header, allocation table, data inside the file).

    Catches truncation and foreign files without a manifest and without reading the data.
    """
    with keep_torch_threads():  # the first ffcv import sets torch to one thread
        from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise BetonError(f"{path} is {size} bytes, too short to be an FFCV beton (truncated)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise BetonError(f"{path} is not an FFCV v{CURRENT_VERSION} beton (header version "
                         f"{int(header['version'])}); it is corrupted or another kind of file")
    table_ptr, n = int(header["alloc_table_ptr"]), int(header["num_samples"])
    if table_ptr == 0 or table_ptr > size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise BetonError(f"{path} is truncated or was never finalised: its allocation table "
                         f"(at byte {table_ptr}) does not end at the end of the file ({size} bytes)")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_ptr)
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_ptr:
        raise BetonError(f"{path} is corrupted: some samples point past its data region")
    if len(table) and int(table["sample_id"].max()) >= n:
        raise BetonError(f"{path} is corrupted: allocation table names samples beyond num_samples={n}")
    return {"num_samples": n, "bytes": size}


def verify_beton(path: str | os.PathLike, check_hash: bool = True,
                 expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the manifest of a complete `.beton`, or raise BetonError saying what is wrong.

    Always: the file and its manifest exist, sizes and sample counts agree, the FFCV structure is
    whole. `check_hash`: also the SHA-256 of the content. `expect`: settings that must match.
    """
    path = Path(path)
    mpath = manifest_path(path)
    if not path.exists():
        raise BetonError(f"{path} does not exist; write it with `python -m data_pipeline.write data=...`")
    if not mpath.exists():
        raise BetonError(f"{path} has no manifest ({mpath.name}): it is incomplete or was not written "
                         "by data_pipeline.write; rewrite it with `python -m data_pipeline.write ... force=true`")
    try:
        manifest = json.loads(mpath.read_text())
        expected_bytes, expected_count = int(manifest["bytes"]), int(manifest["count"])
    except (ValueError, KeyError, TypeError) as e:
        raise BetonError(f"{mpath} is unreadable ({e!r}); rewrite the beton with force=true") from e
    size = path.stat().st_size
    if size != expected_bytes:
        raise BetonError(f"{path} is {size} bytes but its manifest says {expected_bytes}: the file is "
                         "truncated or was replaced; rewrite it with force=true")
    structure = check_structure(path)
    if structure["num_samples"] != expected_count:
        raise BetonError(f"{path} holds {structure['num_samples']} samples but its manifest says "
                         f"{expected_count}; rewrite it with force=true")
    if check_hash and file_sha256(path) != manifest.get("sha256"):
        raise BetonError(f"{path} content hash does not match its manifest (the file was modified or "
                         "replaced); rewrite it with force=true")
    if expect is not None and manifest.get("settings") != dict(expect):
        raise BetonError(f"{path} was written for other data settings {manifest.get('settings')} "
                         f"than requested {dict(expect)}; rewrite it with force=true")
    return manifest


# --------------------------------------------------------------------------------------------
# Writing a file


@contextlib.contextmanager
def _path_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `<path>.lock` (serialises writers across processes)."""
    lock = Path(str(path) + ".lock")
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _safe_writer_class():
    """FFCV's DatasetWriter, except that a crashed worker process raises instead of hanging.

    (FFCV 1.0.2 polls a 'done' counter until it reaches the sample count; if a worker dies, e.g.
    on an image it cannot encode, that never happens and the writer spins forever.)
    """
    from multiprocessing import Process, Queue, Value

    with keep_torch_threads():
        from ffcv.memory_allocator import MemoryAllocator
        from ffcv.writer import DatasetWriter

    class SafeDatasetWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()
            workqueue: Queue = Queue()
            for todo in queue_content:
                workqueue.put(todo)
            allocations_queue: Queue = Queue()
            for _ in range(self.num_workers):
                workqueue.put(None)
            done_number = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                           done_number, allocations_queue, *extra_worker_args)
            processes = [Process(target=work_fn, args=worker_args) for _ in range(self.num_workers)]
            try:
                for p in processes:
                    p.start()
                allocation_list: list = []
                received, idle_after_exit = 0, 0
                while received < len(processes):
                    try:  # a worker sends its allocations once it has written all its samples
                        allocation_list.extend(allocations_queue.get(timeout=0.2))
                        received += 1
                        continue
                    except queue.Empty:
                        pass
                    failed = [p for p in processes if p.exitcode not in (None, 0)]
                    if failed:
                        raise BetonError(f"FFCV writer worker failed (exit code {failed[0].exitcode}) after "
                                         f"{done_number.value} of {num_samples} samples; see its traceback above")
                    if all(p.exitcode == 0 for p in processes):
                        idle_after_exit += 1
                        if idle_after_exit > 25:  # 5 s with every worker gone and nothing queued
                            raise BetonError("FFCV writer workers exited without reporting their allocations")
                if done_number.value != num_samples:
                    raise BetonError(f"FFCV writer wrote {done_number.value} of {num_samples} samples")
                for p in processes:
                    p.join()
                self.finalize(allocation_list)
            finally:
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                        p.join()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return SafeDatasetWriter


def write_beton(source: ImageSource, path: str | os.PathLike, mode: str = "raw",
                max_resolution: int | None = None, jpeg_quality: int = 90, num_workers: int = 1,
                force: bool = False, settings: Mapping[str, Any] | None = None,
                log=None) -> dict[str, Any]:
    """Write `source` to `path` (temp file + rename) and its manifest; reuse a matching file.

    `settings` (see `content_settings`) are stored in the manifest and must match for reuse.
    Returns the manifest; `manifest["reused"]` says whether the existing file was kept.
    """
    with keep_torch_threads():
        from ffcv.fields import IntField, RGBImageField

    if mode not in ("raw", "jpg", "smart"):
        raise ValueError(f"beton mode must be raw, jpg or smart, got {mode!r}")
    path = Path(path).absolute()
    max_res = int(max_resolution or source.resolution)
    settings = dict(settings) if settings is not None else {
        "source": source.name, "split": source.split, "resolution": source.resolution,
        "write_mode": mode, "max_resolution": max_res, **({"jpeg_quality": jpeg_quality} if mode != "raw" else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _path_lock(path):
        if path.exists() and not force:
            try:
                manifest = verify_beton(path, check_hash=True, expect=settings)
                if manifest.get("count") == len(source):
                    return {**manifest, "reused": True}
                problem = f"it holds {manifest.get('count')} images, the source has {len(source)}"
            except BetonError as e:
                problem = str(e)
            raise BetonError(f"{path} exists but cannot be reused: {problem}. Pass force=true to overwrite it")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        mpath = manifest_path(path)
        t0 = time.time()
        try:
            writer = _safe_writer_class()(str(tmp), {
                "image": RGBImageField(write_mode=mode, max_resolution=max_res, jpeg_quality=jpeg_quality),
                "label": IntField(),
            }, page_size=_page_size(source, max_res), num_workers=max(1, int(num_workers)))
            with _quiet_tqdm():
                writer.from_indexed_dataset(source)
            check_structure(tmp)
            labels = source.targets()
            values, counts = np.unique(labels, return_counts=True)
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "source": source.name, "split": source.split, "count": len(source),
                "num_classes": source.num_classes, "classes": list(source.classes),
                "label_counts": {str(int(v)): int(c) for v, c in zip(values, counts)},
                "resolution": min(source.resolution, max_res), "mode": mode, "max_resolution": max_res,
                "jpeg_quality": jpeg_quality if mode != "raw" else None,
                "settings": settings, "bytes": os.path.getsize(tmp), "sha256": file_sha256(tmp),
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "write_seconds": round(time.time() - t0, 2),
            }
            # Old manifest first: from here until the new one lands, the file reads as incomplete.
            mpath.unlink(missing_ok=True)
            os.replace(tmp, path)
            mtmp = mpath.with_name(f".{mpath.name}.{os.getpid()}.tmp")
            mtmp.write_text(json.dumps(manifest, indent=2))
            os.replace(mtmp, mpath)
        finally:
            tmp.unlink(missing_ok=True)
    if log:
        log(f"[data] wrote {path} ({len(source)} images, {manifest['bytes'] / 2 ** 20:.1f} MiB, "
            f"{time.time() - t0:.1f}s)")
    return {**manifest, "reused": False}


def _page_size(source: ImageSource, max_res: int) -> int:
    """FFCV's page size: a sample must fit in one page. 2 MiB (FFCV's minimum) unless the largest
    possible raw image needs more (pages are the unit of waste at the end of each worker)."""
    with keep_torch_threads():
        from ffcv.writer import MIN_PAGE_SIZE

    biggest = 3 * max_res * max_res * 2 + 4096  # raw RGB at the stored size, x2 for non-square/JPEG slack
    size = MIN_PAGE_SIZE
    while size < biggest:
        size *= 2
    return size


@contextlib.contextmanager
def _quiet_tqdm() -> Iterator[None]:
    """FFCV's writer draws a tqdm bar; keep it off non-interactive logs."""
    if sys.stderr.isatty():
        yield
        return
    with keep_torch_threads():
        import ffcv.writer as fw

    real = fw.tqdm

    def quiet(*a, **k):
        k["disable"] = True
        return real(*a, **k)

    fw.tqdm = quiet
    try:
        yield
    finally:
        fw.tqdm = real


def ensure_betons(data_cfg: Mapping[str, Any], splits: list[str], force: bool = False,
                  log=print) -> dict[str, Path]:
    """Write (or reuse) one `.beton` per split of `data_cfg`; return split -> path.

    A file is reused only if it is complete (size, structure, SHA-256) and its manifest's settings
    equal the requested ones; an incomplete or damaged file is reported and rewritten.
    """
    out = {}
    for split in splits:
        path = beton_path(data_cfg, split)
        settings = content_settings(data_cfg, split)
        force_split = force
        if path.exists() and not force:
            try:
                verify_beton(path, check_hash=True, expect=settings)
                out[split] = path
                continue
            except BetonError as e:
                log(f"[data] {e}; rewriting it")
                force_split = True
        source = load_source(data_cfg, split)
        write_beton(source, path, data_cfg.get("write_mode", "raw"), data_cfg.get("max_resolution"),
                    int(data_cfg.get("jpeg_quality", 90)), int(data_cfg.get("write_workers", 1)),
                    force=force_split, settings=settings, log=log)
        out[split] = path
    return out


def read_beton_labels(path: str | os.PathLike) -> np.ndarray:
    """The label of every sample of a beton, in file order (from its metadata; no images read)."""
    with keep_torch_threads():
        from ffcv.reader import Reader

    reader = Reader(str(path))
    return np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-stratified, seeded fraction of the samples (at least one per class), sorted.

    Each class keeps round(fraction * its size) samples drawn by a permutation seeded from `seed`:
    the same seed gives the same labelled subset on every machine and rank.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1ABE1]))
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(members))))
        keep.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(keep))


def read_beton_raw(path: str | os.PathLike) -> tuple[list[np.ndarray], np.ndarray]:
    """Images (HWC uint8) and labels of a raw-mode beton, read directly (no FFCV pipeline).

    For checks and tests: verifies what is stored, independent of loaders and their compilation.
    """
    with keep_torch_threads():
        from ffcv.reader import Reader

    reader = Reader(str(path))
    image_meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    if np.any(image_meta["mode"] != 1):
        raise BetonError(f"{path}: read_beton_raw needs raw-mode images")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    images = []
    for m in image_meta:
        h, w, ptr = int(m["height"]), int(m["width"]), int(m["data_ptr"])
        images.append(np.array(data[ptr: ptr + h * w * 3]).reshape(h, w, 3))
    return images, read_beton_labels(path)


def write_command(cl: CommandLine) -> int:
    force = cl.own.get("force", "false").lower()
    if force not in ("true", "false"):
        raise ConfigError(f"force={force!r} is invalid: allowed: true, false")
    cfg = compose(cl.overrides)
    if cl.show_cfg:
        print(json.dumps(cfg["data"], indent=2))
        return 0
    data_cfg = cfg["data"]
    try:
        paths = ensure_betons(data_cfg, list(data_cfg["splits"]), force=force == "true")
    except (BetonError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, p in paths.items():
        m = json.loads(manifest_path(p).read_text())
        print(f"{split}: {p} ({m['count']} images, {m['num_classes']} classes, {m['resolution']}px "
              f"{m['mode']}, sha256 {m['sha256'][:12]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m data_pipeline.write data=<name> [data.key=value ...] [force=true]`."""
    return cli_main(__doc__, argv, write_command, own_keys=("force",))


if __name__ == "__main__":
    raise SystemExit(main())
