"""FFCV loader factories: two-view SSL, three-view RoCL, weak (crop+flip) and plain eval.

One function, `build_loader(path, views, ...)`, returns a `ViewLoader` that yields dicts
`{"views": [float [B,3,H,W] in [0,1], ...], "label": int64 [B]}` on the training device.
FFCV does decoding, random-resized crop, padding-crop and flips on `num_threads` CPU threads;
the SimCLR colour jitter + grayscale run batched on the device (`data_pipeline.augment`).

Safety: FFCV runs its pipeline in a thread; if that thread raises, FFCV's iterator blocks
forever. `GuardedLoader` catches the exception in the thread and re-raises it in the consumer.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline import PipelineSpec
from ffcv.transforms import RandomHorizontalFlip, RandomTranslate, Squeeze, ToDevice, ToTensor, ToTorchImage

from data_pipeline.augment import ColorAugConfig, color_augment
from data_pipeline.write import verify_beton

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
    """FFCV Loader whose pipeline errors surface in the consumer within a second."""

    def __iter__(self) -> _GuardedEpochIterator:
        from ffcv.pipeline.compiler import Compiler

        Compiler.set_num_threads(self.num_workers)
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
    color: ColorAugConfig = field(default_factory=ColorAugConfig)

    @staticmethod
    def from_cfg(cfg: Mapping[str, Any] | None) -> "AugmentConfig":
        cfg = dict(cfg or {})
        color = ColorAugConfig(**{k: float(v) for k, v in dict(cfg.get("color", {})).items()})
        return AugmentConfig(tuple(cfg.get("crop_scale", (0.08, 1.0))), int(cfg.get("crop_padding", 4)), color)


def _image_ops(kind: str, res: int, aug: AugmentConfig, device: torch.device) -> list:
    tail = [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage()]
    if kind == "ssl":
        return [RandomResizedCropRGBImageDecoder((res, res), scale=aug.crop_scale), RandomHorizontalFlip()] + tail
    if kind == "weak":
        return [SimpleRGBImageDecoder(), RandomTranslate(padding=aug.crop_padding, fill=(0, 0, 0)),
                RandomHorizontalFlip()] + tail
    return [SimpleRGBImageDecoder()] + tail


class ViewLoader:
    """Iterates an FFCV loader and returns float views in [0,1] (+ device colour augmentation)."""

    def __init__(self, loader: GuardedLoader, view_kinds: list[str], aug: AugmentConfig,
                 generator: torch.Generator) -> None:
        self.loader = loader
        self.view_kinds = view_kinds  # per image output: "ssl" (gets colour aug), "weak", "plain"
        self.aug = aug
        self.generator = generator

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self.loader.next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Continue the shuffle order of `epoch` (used on resume)."""
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        names = list(self.loader.pipeline_specs.keys())  # FFCV's output order: fields, then extras
        for batch in self.loader:
            out = dict(zip(names, batch))
            label = out["label"]
            views = []
            for i, kind in enumerate(self.view_kinds):
                img = out["image" if i == 0 else f"image{i + 1}"]
                # ToTorchImage yields channels-last strides; hand out standard NCHW (the
                # worker converts to channels_last itself where configured).
                x = img.to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255.0)
                if kind == "ssl":
                    x = color_augment(x, self.aug.color, self.generator)
                views.append(x)
            yield {"views": views, "label": label.long()}


def build_loader(path: str, views: str, batch_size: int, device: torch.device | str = "cpu",
                 num_threads: int = 1, train: bool = True, seed: int = 0, distributed: bool = False,
                 resolution: int | None = None, augment: Mapping[str, Any] | None = None,
                 drop_last: bool | None = None) -> ViewLoader:
    """Build the loader for one rank.

    views: "two_view" (SimCLR/ACL), "three_view" (RoCL: original, t, t'), "weak" (crop with
    padding + flip: DeACL, adversarial fine-tuning) or "eval" (no augmentation, in order).
    With distributed=True each rank reads its own shard (torch.distributed must be set up).
    """
    if views not in VIEW_KINDS:
        raise ValueError(f"views={views!r} is not known; allowed: {', '.join(VIEW_KINDS)}")
    manifest = verify_beton(path, check_hash=False)
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
    loader = GuardedLoader(str(path), batch_size=batch_size, num_workers=max(1, int(num_threads)),
                           order=order, distributed=distributed, seed=seed, pipelines=pipelines,
                           drop_last=train if drop_last is None else drop_last, os_cache=True)
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + (torch.distributed.get_rank()
                                         if distributed else 0))
    return ViewLoader(loader, kinds, aug, gen)
