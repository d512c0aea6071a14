"""What every Ray Train worker sets up first: device, threads, seed, precision, reporting helpers."""
from __future__ import annotations

import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    num_threads: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint upload at INFO; our epoch line says it all."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context, storage as train_storage

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
        logging.getLogger(train_storage.__name__).setLevel(logging.WARNING)
    except ImportError:  # other Ray versions: keep their logging as it is
        pass


def setup_worker(cfg: Mapping[str, Any]) -> WorkerContext:
    import ray.train
    import ray.train.torch

    _quiet_ray_train_logs()
    ctx = ray.train.get_context()
    threads = int(cfg["cluster"]["cpus_per_worker"])
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed = int(cfg["seed"]) + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return WorkerContext(rank, world, device, threads)


def autocast_context(cfg: Mapping[str, Any], device: torch.device):
    """bf16 autocast on GPU when precision is auto/bf16; fp32 (no autocast) on CPU unless asked."""
    precision = cfg.get("precision", "auto")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def use_channels_last(cfg: Mapping[str, Any], device: torch.device) -> bool:
    """auto: on for CUDA (cuDNN NHWC kernels) and CPU (oneDNN's native layout: the DeACL step
    on a 2-core AMD EPYC was 1.3x faster, see docs/performance.md); off on other devices."""
    v = cfg.get("channels_last", "auto")
    return device.type in ("cuda", "cpu") if v == "auto" else bool(v)


def all_reduce_mean(values: dict[str, torch.Tensor], ctx: WorkerContext) -> dict[str, float]:
    """Average 0-d metric tensors across ranks in one collective; one host sync for all."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys]).to(ctx.device)
    if ctx.distributed and dist.is_initialized():
        dist.all_reduce(stacked)
        stacked /= ctx.world_size
    return dict(zip(keys, stacked.cpu().tolist()))


def all_reduce_sum(values: dict[str, torch.Tensor | float], ctx: WorkerContext) -> dict[str, float]:
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    if ctx.distributed and dist.is_initialized():
        dist.all_reduce(stacked)
    return dict(zip(keys, stacked.cpu().tolist()))


class Progress:
    """Per-epoch progress lines with throughput and ETA (rank 0 only)."""

    def __init__(self, stage: str, epochs: int, start_epoch: int, enabled: bool) -> None:
        self.stage, self.epochs, self.enabled = stage, epochs, enabled
        self.t0, self.done0 = time.time(), start_epoch

    def epoch_line(self, epoch: int, images: int, seconds: float, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        done = epoch + 1 - self.done0
        eta = (time.time() - self.t0) / max(done, 1) * (self.epochs - epoch - 1)
        shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                         if k not in ("epoch", "images_per_s", "epoch_time_s") and isinstance(v, (int, float)))
        print(f"[{self.stage}] epoch {epoch + 1}/{self.epochs} {shown} | {images / max(seconds, 1e-9):.0f} img/s "
              f"| {seconds:.1f}s/epoch | eta {eta / 60:.1f} min", flush=True)


def new_checkpoint_dir() -> str:
    return tempfile.mkdtemp(prefix="rssl-ckpt-")


# --------------------------------------------------------------------------------------------
# Synchronised batch norm that also works on CPU (gloo). torch.nn.SyncBatchNorm refuses CPU
# tensors, so `cluster.sync_bn` on a CPU cluster uses this one; on CUDA, torch's kernel is used.


class CollectiveBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are computed over the whole global batch.

    Each rank computes its per-channel (count, mean, M2), one autograd-aware all_gather
    exchanges them, and Chan's parallel formula combines them (as torch's CUDA SyncBatchNorm
    does), so the forward and the backward equal BatchNorm over the concatenated batch.
    Same parameter and buffer names as nn.BatchNorm*d: its state dict loads into plain BN.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1)
        if not sync:
            return super().forward(x)
        from torch.distributed.nn.functional import all_gather

        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x if x.dtype == torch.float64 else x.float()  # statistics in fp32 at least
        count = torch.full((1,), x.numel() // c, dtype=xf.dtype, device=x.device)
        mean = xf.mean(dims)
        m2 = (xf - mean.view(1, c, *[1] * (x.dim() - 2))).pow(2).sum(dims)
        packed = torch.stack(all_gather(torch.cat([count, mean, m2])))  # [W, 1 + 2C]
        counts, means, m2s = packed[:, :1], packed[:, 1:1 + c], packed[:, 1 + c:]
        n = counts.sum()
        g_mean = (counts * means).sum(0) / n
        g_m2 = (m2s + counts * (means - g_mean).pow(2)).sum(0)
        var = g_m2 / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(g_mean.detach().to(self.running_mean.dtype), alpha=f)
                unbiased = g_m2.detach() / (n.detach() - 1).clamp_min(1)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - g_mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every BatchNorm by a synchronised one (in place below the root; returns the root).

    CUDA: torch.nn.SyncBatchNorm (NCCL). Anything else: CollectiveBatchNorm (gloo).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (CollectiveBatchNorm, nn.SyncBatchNorm)):
        new = CollectiveBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


# --------------------------------------------------------------------------------------------
# Fault injection for tests and fire drills (cluster.debug.*). Never active unless configured.


def _marker_fs():
    """(pyarrow filesystem, run folder on it) of the current Ray Train run."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.experiment_fs_path


def maybe_inject_failure(cfg: Mapping[str, Any], ctx: WorkerContext, epoch: int, step: int,
                         steps: int) -> None:
    """`cluster.debug.fail_at_epoch=N`: rank `fail_rank` dies (os._exit(1)) half-way through
    1-based epoch N, once: a marker in the run folder makes the restarted attempt go on."""
    debug = (cfg["cluster"].get("debug") or {})
    at = debug.get("fail_at_epoch")
    if not at or epoch + 1 != int(at) or step != steps // 2:
        return
    if ctx.rank != int(debug.get("fail_rank", 0)) % ctx.world_size:
        return
    import pyarrow.fs

    fs, run_path = _marker_fs()
    marker = f"{run_path}/fault_injected_epoch{int(at)}"
    if fs.get_file_info(marker).type != pyarrow.fs.FileType.NotFound:
        return
    fs.create_dir(run_path, recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(f"rank {ctx.rank} killed at epoch {epoch + 1} step {step}\n".encode())
    # Ray's controller registers a reported checkpoint when it next polls the workers (every 2 s);
    # a real mid-epoch failure comes long after the last report, so wait like one before dying.
    delay = float(debug.get("fail_delay_s", 5.0))
    print(f"[debug] cluster.debug.fail_at_epoch={at}: killing rank {ctx.rank} at step {step} "
          f"in {delay:g}s", flush=True)
    time.sleep(delay)
    os._exit(1)


def inject_nonfinite(cfg: Mapping[str, Any], epoch: int) -> bool:
    """`cluster.debug.nonfinite_at_epoch=N`: the loss of 1-based epoch N becomes NaN (tests)."""
    at = (cfg["cluster"].get("debug") or {}).get("nonfinite_at_epoch")
    return bool(at) and epoch + 1 == int(at)
