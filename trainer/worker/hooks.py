"""Epoch hooks: what the pre-training loop calls around its epochs, besides training itself.

A hook overrides any of `before_epoch`, `on_step`, `after_epoch` (returns metrics to report) and
`after_report` (gets the epoch's report and where its time went). The loop builds the default ones
(`default_hooks`: the kNN monitor, the validation monitor Tune optimises, fault injection when
`cluster.debug` asks for it); callers add their own (`pretrain_loop(config, extra_hooks=...)`,
e.g. benchmarks/pipeline_efficiency.py's timing).
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

from data_pipeline.loaders import build_loader
from data_pipeline.write import beton_path
from trainer.distributed import WorkerContext
from trainer.evaluation.features import extract_features, knn_accuracy
from trainer.evaluation.monitor import build_val_monitor
from trainer.models import Encoder
from trainer.worker.step import TrainStep


class EpochHook:
    """No-op base: override what the hook needs. `name` labels its time in the timings."""

    name = "hook"

    def before_epoch(self, epoch: int) -> None:
        """`epoch` counts from 0."""

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        """Before each training step."""

    def after_epoch(self, epoch: int, encoder: Encoder) -> dict[str, float]:
        """After the epoch's steps, with the exported encoder; the metrics to add to its report."""
        return {}

    def after_report(self, epoch: int, report: Mapping[str, Any], timings: Mapping[str, Any]) -> None:
        """After `ray.train.report` (the checkpoint is persisted); `timings` says where the epoch went:
        step_loop_s, data_wait_s, hooks_s (per hook name), checkpoint_write_s, report_s."""


class KnnMonitor(EpochHook):
    """kNN accuracy of the backbone features every `monitor.knn_every` epochs and after the last."""

    name = "knn"

    def __init__(self, cfg: Mapping[str, Any], ctx: WorkerContext, per_rank_batch: int, epochs: int) -> None:
        data = cfg["data"]
        self.every, self.epochs, self.num_classes = int(cfg["monitor"]["knn_every"]), epochs, int(data["num_classes"])
        self.split = "val" if "val" in data["splits"] else "test"
        self.loaders = [build_loader(str(beton_path(data, s)), "eval", per_rank_batch, ctx.device, ctx.num_threads,
                                     train=False, distributed=ctx.distributed, drop_last=False)
                        for s in ("train", self.split)]

    def after_epoch(self, epoch: int, encoder: Encoder) -> dict[str, float]:
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return {}
        trf, trl = extract_features(encoder, self.loaders[0])
        tef, tel = extract_features(encoder, self.loaders[1])
        return {f"knn_{self.split}_acc": knn_accuracy(trf, trl, tef, tel, num_classes=self.num_classes)}


class ValMonitorHook(EpochHook):
    """The validation monitor (linear probe + clean/PGD accuracy on val): Tune's metric."""

    name = "val_monitor"

    def __init__(self, monitor: Any, epochs: int) -> None:
        self.monitor, self.epochs = monitor, epochs

    def after_epoch(self, epoch: int, encoder: Encoder) -> dict[str, float]:
        return self.monitor(encoder) if self.monitor.due(epoch + 1, self.epochs) else {}


class FaultInjection(EpochHook):
    """`cluster.debug`: kill a rank half-way through an epoch, or make an epoch's loss NaN (tests)."""

    name = "fault_injection"

    def __init__(self, debug: Mapping[str, Any], ctx: WorkerContext, train_step: TrainStep) -> None:
        self.debug, self.ctx, self.train_step = debug, ctx, train_step

    def before_epoch(self, epoch: int) -> None:
        at = self.debug["nonfinite_at_epoch"]
        self.train_step.poison_loss = bool(at) and epoch + 1 == at

    def on_step(self, epoch: int, step: int, steps: int) -> None:
        at = self.debug["fail_at_epoch"]
        if at and epoch + 1 == at and step == steps // 2 and self.ctx.rank == self.debug["fail_rank"] % self.ctx.world_size:
            self._die_once(epoch, step)

    def _die_once(self, epoch: int, step: int) -> None:
        """os._exit(1) once: a marker in the run folder lets the restarted attempt go on."""
        import pyarrow.fs
        import ray.train

        storage = ray.train.get_context().get_storage()
        fs, run_path = storage.storage_filesystem, storage.experiment_fs_path
        marker = f"{run_path}/fault_injected_epoch{epoch + 1}"
        if fs.get_file_info(marker).type != pyarrow.fs.FileType.NotFound:
            return
        fs.create_dir(run_path, recursive=True)
        with fs.open_output_stream(marker) as f:
            f.write(f"rank {self.ctx.rank} killed at epoch {epoch + 1} step {step}\n".encode())
        # Ray's controller registers a reported checkpoint when it next polls the workers (every 2 s);
        # a real mid-epoch failure comes long after the last report, so wait like one before dying.
        delay = float(self.debug["fail_delay_s"])
        print(f"[debug] cluster.debug.fail_at_epoch={epoch + 1}: killing rank {self.ctx.rank} at step {step} "
              f"in {delay:g}s", flush=True)
        time.sleep(delay)
        os._exit(1)


def default_hooks(cfg: Mapping[str, Any], ctx: WorkerContext, train_step: TrainStep, per_rank_batch: int,
                  epochs: int) -> list[EpochHook]:
    hooks: list[EpochHook] = []
    if cfg["monitor"]["knn_every"] > 0:
        hooks.append(KnnMonitor(cfg, ctx, per_rank_batch, epochs))
    monitor = build_val_monitor(cfg, per_rank_batch, ctx)
    if monitor is not None:
        hooks.append(ValMonitorHook(monitor, epochs))
    debug = cfg["cluster"]["debug"]
    if debug["fail_at_epoch"] or debug["nonfinite_at_epoch"]:
        hooks.append(FaultInjection(debug, ctx, train_step))
    return hooks
