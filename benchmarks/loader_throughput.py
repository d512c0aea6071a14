"""Two-view SimCLR loader throughput: FFCV + batched colour jitter vs a torchvision DataLoader.

    python benchmarks/loader_throughput.py                      # 10k synthetic 32x32 images, 2 threads
    python benchmarks/loader_throughput.py --images 50000 --threads 8 --batch 512

Both sides produce the same thing from the same 32x32 images: two views per image of
RandomResizedCrop(32, scale=(0.08, 1)) + RandomHorizontalFlip + RandomApply(ColorJitter(0.4, 0.4,
0.4, 0.1), p=0.8) + RandomGrayscale(0.2), as float [B, 3, 32, 32] batches in [0, 1].

* ffcv: `data_pipeline.loaders.build_loader(..., "two_view")` on a raw-mode .beton, FFCV with
  `--threads` numba threads, colour jitter batched in torch (same thread budget) on the CPU;
* torchvision: `torch.utils.data.DataLoader(num_workers=--threads)` over the same images in
  memory (PIL), the standard per-image `torchvision.transforms` pipeline, torch's default collate.

The process is pinned to `--threads` CPUs (when the machine has that many), both loaders get a
warm-up epoch (numba compilation, worker start-up), then epochs are timed alternately and the best
epoch of each is reported (other load on a shared machine only ever slows an epoch down).
Images/s counts source images (each yields two views). CPU-ms/image (this process's threads
plus the DataLoader's exited workers) is reported too: it is less sensitive to other load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _TwoViews:
    def __init__(self, transform) -> None:
        self.t = transform

    def __call__(self, img):
        return self.t(img), self.t(img)


class _PILDataset:
    """The same images as the beton, decoded in memory (as torchvision.datasets.CIFAR10 holds them)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _torchvision_loader(images, labels, batch: int, threads: int, res: int):
    import torch
    from torchvision import transforms as T

    aug = T.Compose([
        T.RandomResizedCrop(res, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.ToTensor(),
    ])
    ds = _PILDataset(images, labels, _TwoViews(aug))
    # Workers are (re)started each epoch (the DataLoader default) so that their CPU time can be
    # accounted when they exit; starting 2 forked workers costs well under a second.
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=threads, drop_last=True,
                                       prefetch_factor=4)


def _cpu_seconds() -> float:
    """CPU time of this process (all its threads) plus its exited, waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _epoch(loader, kind: str) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one epoch."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for batch in loader:
        if kind == "ffcv":
            v1, v2 = batch["views"]
        else:
            (v1, v2), _ = batch
        assert v1.shape == v2.shape and v1.dtype == v2.dtype
        n += v1.shape[0]
    wall = time.perf_counter() - t0
    if kind != "ffcv":
        time.sleep(0.5)  # let the DataLoader's workers exit and be reaped (their CPU time lands)
    return n, wall, _cpu_seconds() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (best is reported)")
    ap.add_argument("--work-dir", default=None, help="where the .beton goes (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > args.threads:
        os.sched_setaffinity(0, cpus[: args.threads])  # children (DataLoader workers) inherit it
    import torch

    from data_pipeline.loaders import build_loader
    from data_pipeline.write import ensure_betons

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="loader_bench_"))
    data_cfg = {"name": "synthetic", "num_classes": 10, "resolution": args.resolution, "train_size": args.images,
                "test_size": 10, "seed": 0, "val_fraction": 0.0, "beton_dir": str(work), "write_mode": "raw",
                "max_resolution": args.resolution, "write_workers": args.threads}
    t0 = time.perf_counter()
    path = ensure_betons(data_cfg, ["train"], log=print)["train"]
    print(f"beton ready in {time.perf_counter() - t0:.1f}s: {path}")
    # The same images for torchvision, straight from the beton (raw mode).
    from data_pipeline.write import read_beton_raw
    imgs, labels = read_beton_raw(path)
    images = np.stack(imgs)

    ffcv = build_loader(str(path), "two_view", args.batch, "cpu", num_threads=args.threads, train=True, seed=0)
    tv = _torchvision_loader(images, labels, args.batch, args.threads, args.resolution)
    torch.set_num_threads(args.threads)

    print("warm-up (numba compilation, worker start-up) ...", flush=True)
    t0 = time.perf_counter()
    _epoch(ffcv, "ffcv")
    w_ffcv = time.perf_counter() - t0
    t0 = time.perf_counter()
    _epoch(tv, "tv")
    w_tv = time.perf_counter() - t0
    print(f"  warm-up epoch: ffcv {w_ffcv:.1f}s, torchvision {w_tv:.1f}s")
    rates: dict[str, list[float]] = {"ffcv": [], "torchvision": []}
    cpu_ms: dict[str, list[float]] = {"ffcv": [], "torchvision": []}
    for e in range(args.epochs):
        for name, loader, kind in (("ffcv", ffcv, "ffcv"), ("torchvision", tv, "tv")):
            n, dt, cpu = _epoch(loader, kind)
            rates[name].append(n / dt)
            cpu_ms[name].append(cpu / n * 1000)
            print(f"  epoch {e + 1} {name:12s} {n} images in {dt:6.2f}s = {n / dt:7.0f} images/s "
                  f"({cpu / n * 1000:.2f} CPU-ms/image)", flush=True)
    best = {k: max(v) for k, v in rates.items()}
    best_cpu = {k: min(v) for k, v in cpu_ms.items()}
    ratio = best["ffcv"] / best["torchvision"]
    load = os.getloadavg()
    print()
    print(f"two-view SSL loader, {args.images} images {args.resolution}x{args.resolution}, batch {args.batch}, "
          f"{args.threads} CPU threads, best of {args.epochs} epochs")
    print(f"  ffcv + batched colour jitter : {best['ffcv']:7.0f} images/s  ({best_cpu['ffcv']:.2f} CPU-ms/image)")
    print(f"  torchvision DataLoader       : {best['torchvision']:7.0f} images/s  "
          f"({best_cpu['torchvision']:.2f} CPU-ms/image)")
    print(f"  ratio                        : {ratio:7.1f}x  (CPU time per image: "
          f"{best_cpu['torchvision'] / best_cpu['ffcv']:.1f}x less)")
    print(f"  machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rates": rates, "cpu_ms_per_image": cpu_ms,
                                               "best": best, "ratio": ratio, "loadavg": load}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
