"""FFCV loader factories: two-view SSL, three-view RoCL, weak (crop+flip) and plain eval.

One function, `build_loader(path, views, ...)`, returns a `ViewLoader` that yields dicts
`{"views": [float [B,3,H,W] in [0,1], ...], "label": int64 [B]}` on the training device.
FFCV does decoding, random-resized crop, padding-crop and flips on `num_threads` CPU threads;
the SimCLR colour jitter + grayscale run batched on the device (`data_pipeline.augment`).

Safety: FFCV runs its pipeline in a thread; if that thread raises, FFCV's iterator blocks
forever. `GuardedLoader` catches the exception in the thread and re-raises it in the consumer.
"""
from __future__ import annotations

import contextlib
import os
import queue
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from data_pipeline import keep_torch_threads
from data_pipeline.augment import ColorAugConfig, color_augment
from data_pipeline.write import verify_beton

with keep_torch_threads():  # importing ffcv sets torch to one thread
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import (RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor,
                                 ToTorchImage)

VIEW_KINDS = ("two_view", "three_view", "weak", "eval")

_DONE = object()


class PipelineError(RuntimeError):
    """An exception raised inside FFCV's pipeline thread, re-raised in the training loop."""


class _GuardedEpochIterator(EpochIterator):
    def run(self) -> None:  # runs in FFCV's thread
        try:
            super().run()
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            self.error = exc
            try:
                self.output_queue.put_nowait(_DONE)
            except queue.Full:
                pass

    def run_pipeline(self, *args: Any) -> Any:  # runs in FFCV's thread
        # FFCV's ToTensor/ToDevice copy batches with torch ops in this thread, and its
        # Compiler.set_num_threads(n) (run first in this thread) gives it n torch threads: a
        # second OpenMP team whose idle threads spin-wait after every batch, beside the training
        # step's team. On a 2-core CPU worker that cost 11% of the step's speed (pipeline
        # efficiency 0.88 -> 0.99, docs/performance.md). The copies are tiny: one thread here;
        # numba keeps its n threads for decoding, the training thread keeps its own count.
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        return super().run_pipeline(*args)

    def __next__(self):
        while True:
            try:
                item = self.output_queue.get(timeout=0.5)
                break
            except queue.Empty:
                if getattr(self, "error", None) is not None or not self.is_alive():
                    item = _DONE
                    break
        if item is _DONE or getattr(self, "error", None) is not None:
            err = getattr(self, "error", None)
            self.close()
            raise PipelineError(f"FFCV pipeline thread failed: {err!r}") from err
        if item is None:
            self.close()
            raise StopIteration()
        slot, result = item
        if torch.cuda.is_available():
            self.current_stream.wait_stream(self.cuda_streams[slot])
        return result


class GuardedLoader(Loader):
    """FFCV Loader whose pipeline errors surface in the consumer within a second, and which
    leaves the consumer's torch thread count alone (FFCV's sets it to the loader's)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with keep_torch_threads():
            super().__init__(*args, **kwargs)

    def __iter__(self) -> _GuardedEpochIterator:
        with keep_torch_threads():
            Compiler.set_num_threads(self.num_workers)  # numba's pool: FFCV's decoding threads
        order = self.next_traversal_order()
        selected = order[: len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return _GuardedEpochIterator(self, selected)


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_padding: int = 4
    flip: bool = True
    color: ColorAugConfig = field(default_factory=ColorAugConfig)

    @staticmethod
    def from_cfg(cfg: Mapping[str, Any] | None) -> "AugmentConfig":
        cfg = dict(cfg or {})
        color = ColorAugConfig(**{k: float(v) for k, v in dict(cfg.get("color", {})).items()})
        return AugmentConfig(tuple(float(v) for v in cfg.get("crop_scale", (0.08, 1.0))),
                             int(cfg.get("crop_padding", 4)), bool(cfg.get("flip", True)), color)


def _image_ops(kind: str, res: int, aug: AugmentConfig, device: torch.device) -> list:
    """FFCV ops for one image output. "ssl": RandomResizedCrop(res, scale, ratio 3/4..4/3) + flip
    (as torchvision's; FFCV resizes with OpenCV INTER_AREA); "weak": pad-and-crop (RandomCrop with
    zero padding) + flip; "plain": decode only. Colour jitter is applied later, batched."""
    tail = [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    flip = [RandomHorizontalFlip()] if aug.flip else []
    if kind == "ssl":
        return [RandomResizedCropRGBImageDecoder((res, res), scale=aug.crop_scale)] + flip + tail
    if kind == "weak":
        pad = [RandomTranslate(padding=aug.crop_padding, fill=(0, 0, 0))] if aug.crop_padding > 0 else []
        return [SimpleRGBImageDecoder()] + pad + flip + tail
    return [SimpleRGBImageDecoder()] + tail


class ViewLoader:
    """Iterates an FFCV loader and returns float views in [0,1] (+ device colour augmentation).

    The shuffle order of epoch e is a function of (seed, e) only (FFCV: `seed + e`, or
    DistributedSampler(seed).set_epoch(e) per rank), and the colour-augmentation generator is
    re-seeded from (seed, rank, e) at the start of every epoch, so `set_epoch(e)` on a fresh
    loader continues exactly where a previous run's epoch e would have started. (FFCV's crop and
    flip draw from numba's per-thread RNG and are not reproducible.)
    """

    def __init__(self, loader: GuardedLoader, view_kinds: list[str], aug: AugmentConfig,
                 seed: int = 0, rank: int = 0) -> None:
        self.loader = loader
        self.view_kinds = view_kinds  # per image output: "ssl" (gets colour aug), "weak", "plain"
        self.aug = aug
        self.seed, self.rank = int(seed), int(rank)
        self.generator = torch.Generator()
        # On a CPU device the colour jitter runs while FFCV's threads decode the next batches:
        # split the thread budget instead of oversubscribing the cores.
        self.color_threads = max(1, loader.num_workers // 2)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        """The epoch the next `iter()` will produce."""
        return self.loader.next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` produce epoch `epoch` (used on resume)."""
        self.loader.next_epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The sample indices this rank reads in `epoch` (before batching / drop_last)."""
        return np.asarray(self.loader.traversal_order.sample_order(int(epoch)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = list(self.loader.pipeline_specs.keys())  # FFCV's output order: fields, then extras
        self.generator.manual_seed((self.seed * 1_000_003 + self.rank) * 100_003 + self.loader.next_epoch)
        it = iter(self.loader)
        try:
            for batch in it:
                out = dict(zip(names, batch))
                views = []
                for i, kind in enumerate(self.view_kinds):
                    img = out["image" if i == 0 else f"image{i + 1}"]
                    # ToTorchImage yields channels-last strides; hand out standard NCHW (the
                    # worker converts to channels_last itself where configured).
                    x = img.to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255.0)
                    if kind == "ssl":
                        with _torch_threads(self.color_threads if x.device.type == "cpu" else None):
                            x = color_augment(x, self.aug.color, self.generator)
                    views.append(x)
                yield {"views": views, "label": out["label"].long()}
        finally:
            it.close()


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with `n` torch intra-op threads (None: unchanged), then restore."""
    with keep_torch_threads():
        if n is not None and n != torch.get_num_threads():
            torch.set_num_threads(n)
        yield


def default_num_threads() -> int:
    """CPU threads this process may use: the Ray worker's CPU allocation inside Ray (actor or
    task), else the CPU affinity of the process."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # noqa: BLE001 - not in a Ray worker
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def loader_threads(num_threads: int | None) -> int:
    """`num_threads` (default: `default_num_threads()`), capped at numba's thread pool size
    (numba refuses more threads than it started with; FFCV would crash)."""
    import numba

    n = default_num_threads() if num_threads in (None, 0, -1) else int(num_threads)
    return max(1, min(n, numba.config.NUMBA_NUM_THREADS))


def build_loader(path: str, views: str, batch_size: int, device: torch.device | str = "cpu",
                 num_threads: int | None = None, train: bool = True, seed: int = 0, distributed: bool = False,
                 resolution: int | None = None, augment: Mapping[str, Any] | None = None,
                 drop_last: bool | None = None) -> ViewLoader:
    """Build the loader for one rank.

    views: "two_view" (SimCLR/ACL), "three_view" (RoCL: original, t, t'), "weak" (crop with
    padding + flip: DeACL, adversarial fine-tuning) or "eval" (no augmentation, in order).
    With distributed=True each rank reads its own shard (torch.distributed must be set up):
    FFCV emulates DistributedSampler, which pads the order with repeated samples so every rank
    gets ceil(N / world) samples. num_threads: FFCV/numba threads (default: the Ray worker's CPU
    allocation). The file is checked first (manifest, size, structure): a truncated or replaced
    beton raises BetonError instead of being read.
    """
    if views not in VIEW_KINDS:
        raise ValueError(f"views={views!r} is not known; allowed: {', '.join(VIEW_KINDS)}")
    manifest = verify_beton(path, check_hash=False)
    rank = 0
    if distributed:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised "
                               "(build the loader inside the Ray Train worker, after setup)")
        rank = torch.distributed.get_rank()
    res = int(resolution or manifest["resolution"])
    aug = AugmentConfig.from_cfg(augment)
    device = torch.device(device)
    kinds = {"two_view": ["ssl", "ssl"], "three_view": ["plain", "ssl", "ssl"],
             "weak": ["weak"], "eval": ["plain"]}[views]
    pipelines: dict[str, Any] = {}
    for i, kind in enumerate(kinds):
        ops = _image_ops(kind, res, aug, device)
        name = "image" if i == 0 else f"image{i + 1}"
        pipelines[name] = ops if i == 0 else PipelineSpec("image", ops[0], ops[1:])
    pipelines["label"] = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    loader = GuardedLoader(str(path), batch_size=batch_size, num_workers=loader_threads(num_threads),
                           order=order, distributed=distributed, seed=int(seed), pipelines=pipelines,
                           drop_last=train if drop_last is None else drop_last, os_cache=True)
    if len(loader) == 0:
        n = len(loader.first_traversal_order)
        raise ValueError(f"{path}: this rank's shard has {n} images, fewer than batch_size={batch_size} "
                         "with drop_last: no batch at all; lower the batch size")
    return ViewLoader(loader, kinds, aug, seed=int(seed), rank=rank)
