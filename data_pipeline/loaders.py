"""FFCV loader factories: two-view SSL, three-view RoCL, weak (crop+flip) and plain eval.

One function, `build_loader(path, views, ...)`, returns a `ViewLoader` that yields dicts
`{"views": [float [B,3,H,W] in [0,1], ...], "label": int64 [B], "index": int64 [B]}` on the
training device (`index`: the samples' positions in the dataset, on the CPU). FFCV reads and
decodes the images on `num_threads` CPU threads, once per batch whatever the number of views;
every augmentation (random resized crop, padded crop, flip, colour jitter, grayscale) runs batched
on the device from counter-based draws (`data_pipeline.views`), so a sample's views are a function
of (seed, epoch, sample index, view) alone. The shuffle order of epoch e is a function of
(seed, e) (FFCV: `seed + e`, or DistributedSampler(seed).set_epoch(e) per rank).

Safety: FFCV runs its pipeline in a thread; if that thread raises, FFCV's iterator blocks
forever. `GuardedLoader` catches the exception in the thread and re-raises it in the consumer.
"""
from __future__ import annotations

import contextlib
import os
import queue
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from data_pipeline import keep_torch_threads
from data_pipeline.views import AugmentConfig, make_views
from data_pipeline.write import verify_beton

with keep_torch_threads():  # importing ffcv sets torch to one thread
    from ffcv.fields.basics import BasicDecoder, IntDecoder
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.pipeline import PipelineSpec
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

# method views -> one entry per view: "ssl" (strong), "weak" (crop + flip), "plain" (as stored)
VIEW_KINDS: dict[str, list[str]] = {"two_view": ["ssl", "ssl"], "three_view": ["plain", "ssl", "ssl"],
                                    "weak": ["weak"], "eval": ["plain"]}

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


class SampleIndexDecoder(BasicDecoder):
    """Decodes nothing: yields each sample's index in the dataset (what the augmentations key on)."""

    dtype = np.dtype("<i8")

    def generate_code(self):
        def decoder(indices, destination, metadata, storage_state):
            for ix, sample_id in enumerate(indices):
                destination[ix] = sample_id
            return destination[:len(indices)]

        return decoder


class ViewLoader:
    """Iterates an FFCV loader and returns the method's views (float in [0,1]), labels and indices.

    `set_epoch(e)` on a fresh loader reproduces epoch e exactly: its order is a function of (seed,
    e) and every augmentation of (seed, e, sample index, view).
    """

    def __init__(self, loader: GuardedLoader, view_kinds: list[str], aug: AugmentConfig, seed: int = 0) -> None:
        self.loader = loader
        self.view_kinds = view_kinds  # per view: "ssl", "weak" or "plain"
        self.aug = aug
        self.seed = int(seed)
        # On a CPU device the augmentations run while FFCV's threads decode the next batches:
        # split the thread budget instead of oversubscribing the cores.
        self.augment_threads = max(1, loader.num_workers // 2)

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
        epoch = self.loader.next_epoch
        it = iter(self.loader)
        try:
            for batch in it:
                out = dict(zip(names, batch))
                # ToTorchImage yields channels-last strides; hand out standard NCHW (the worker
                # converts to channels_last itself where configured).
                x = out["image"].to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255.0)
                with _torch_threads(self.augment_threads if x.device.type == "cpu" else None):
                    views = make_views(x, out["index"], epoch, self.view_kinds, self.aug, self.seed)
                yield {"views": views, "label": out["label"].long(), "index": out["index"].long()}
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
                 augment: Mapping[str, Any] | None = None, drop_last: bool | None = None,
                 indices: Sequence[int] | None = None) -> ViewLoader:
    """Build the loader for one rank.

    views: "two_view" (SimCLR/ACL), "three_view" (RoCL: original, t, t'), "weak" (crop with
    padding + flip: DeACL, adversarial fine-tuning) or "eval" (no augmentation, in order).
    With distributed=True each rank reads its own shard (torch.distributed must be set up):
    FFCV emulates DistributedSampler, which pads the order with repeated samples so every rank
    gets ceil(N / world) samples. num_threads: FFCV/numba threads (default: the Ray worker's CPU
    allocation). `indices`: read only these samples (e.g. a labelled fraction; batches keep the
    original sample indices, so the seeded augmentation is the same as in the whole split). The
    file is checked first (manifest, size, structure): a truncated or replaced beton raises
    BetonError instead of being read.
    """
    if views not in VIEW_KINDS:
        raise ValueError(f"views={views!r} is not known; allowed: {', '.join(VIEW_KINDS)}")
    kinds = VIEW_KINDS[views]
    verify_beton(path, check_hash=False)
    if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised "
                           "(build the loader inside the Ray Train worker, after setup)")
    device = torch.device(device)
    pipelines: dict[str, Any] = {
        "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()],
        "label": [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)],
        "index": PipelineSpec("label", SampleIndexDecoder(), [ToTensor(), Squeeze(1)]),
    }
    order = OrderOption.RANDOM if train else OrderOption.SEQUENTIAL
    loader = GuardedLoader(str(path), batch_size=batch_size, num_workers=loader_threads(num_threads),
                           order=order, distributed=distributed, seed=int(seed), pipelines=pipelines,
                           drop_last=train if drop_last is None else drop_last, os_cache=True,
                           indices=None if indices is None else [int(i) for i in indices])
    if len(loader) == 0:
        n = len(loader.first_traversal_order)
        raise ValueError(f"{path}: this rank's shard has {n} images, fewer than batch_size={batch_size} "
                         "with drop_last: no batch at all; lower the batch size")
    return ViewLoader(loader, kinds, AugmentConfig.from_cfg(augment), seed=int(seed))
