"""One training step as every pre-training worker runs it, and how a method is prepared for it.

`prepare_method` applies the speed options of the config to a method, in the order they must
happen: memory layout (`channels_last`, encoder and frozen helpers such as DeACL's teacher),
`torch.compile` (in place, so checkpoint keys do not change), then the DDP wrap.
`TrainStep` is the step itself: batch layout, autocast (`precision`), `method.training_step`,
backward, optimiser, per-step schedule. Metrics stay 0-d tensors on the device: nothing in a
step synchronises with the host, so a GPU queue never drains between steps.

Every option degrades cleanly: `precision: auto` is bf16 on CUDA and fp32 elsewhere,
`channels_last: auto` follows `use_channels_last`, and `compile: true` without a C++ compiler
(needed by inductor on CPU) prints one line and runs eagerly. See docs/performance.md.
"""
from __future__ import annotations

import os
import shutil
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import torch
from torch import nn

from trainer.methods import Method


def autocast_context(cfg: Mapping[str, Any], device: torch.device):
    """bf16 autocast on GPU when precision is auto/bf16; fp32 (no autocast) on CPU unless asked."""
    precision = cfg["precision"]
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def use_channels_last(cfg: Mapping[str, Any], device: torch.device) -> bool:
    """auto: on for CUDA (cuDNN NHWC kernels) and CPU (oneDNN's native layout: the DeACL step
    on a 2-core AMD EPYC was 1.3x faster, see docs/performance.md); off on other devices."""
    v = cfg["channels_last"]
    return device.type in ("cuda", "cpu") if v == "auto" else bool(v)


def compile_available(device: torch.device, backend: str = "inductor") -> tuple[bool, str]:
    """Whether torch.compile can generate code for `device` here (and why not)."""
    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    if device.type == "cpu" and backend == "inductor":
        cxx = os.environ.get("CXX") or "c++"
        if not (shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")):
            return False, "inductor needs a C++ compiler on CPU and none was found"
    return True, ""


def _raise_recompile_limit(limit: int = 64) -> None:
    """Methods legitimately run a few graph variants (train/eval mode, BN route, frozen or not)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, int(getattr(torch._dynamo.config, name))))


def prepare_method(method: Method, cfg: Mapping[str, Any], device: torch.device,
                   wrap: Callable[[nn.Module], nn.Module] | None = None,
                   log: Callable[[str], None] = print, backend: str = "inductor") -> None:
    """channels_last -> torch.compile -> DDP wrap (wrap=None: no wrapper, e.g. benchmarks).
    backend: torch.compile's; training uses inductor, a benchmark's dry run "eager" (dynamo
    traces every graph, guards and recompiles as for inductor, and generates no code)."""
    if use_channels_last(cfg, device):
        method.to_channels_last()
    mode = cfg["compile"]
    if mode:
        ok, why = compile_available(device, backend)
        if ok:
            _raise_recompile_limit()
            method.compile(backend=backend, **({"mode": mode} if isinstance(mode, str) else {}))
        else:
            log(f"compile={mode!r} ignored: {why}; running eagerly")
    if wrap is not None:
        method.parallelize(wrap)


class TrainStep:
    """Callable `step(batch) -> metrics` (0-d device tensors). One optimiser step per call."""

    def __init__(self, method: Method, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                 cfg: Mapping[str, Any], device: torch.device) -> None:
        self.method, self.optimizer, self.scheduler = method, optimizer, scheduler
        self.amp = autocast_context(cfg, device)
        self.channels_last = use_channels_last(cfg, device)
        self.poison_loss = False  # fault injection (trainer/worker/hooks.py): the loss becomes NaN

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.channels_last:
            batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
        with self.amp:
            loss, metrics = self.method.training_step(batch)
        if self.poison_loss:
            loss = loss * float("nan")
            metrics = {**metrics, "loss": loss.detach()}
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return metrics
