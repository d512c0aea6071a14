"""Model FLOP utilisation helpers: a step's FLOPs, the machine's matmul peak, peak memory, and where
a step's time goes. Used by `step_throughput.py --mfu` and `gpu_check.py`; imports only torch."""
from __future__ import annotations

import resource
import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# the ops that do a step's FLOPs (convolutions and matmuls, forward and backward)
DENSE_OPS = ("conv", "mm", "addmm", "bmm", "matmul", "linear", "baddbmm")


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker: its backward hooks raise inside
    `torch.autograd.grad` on a leaf input (PGD's input gradient), and only the total is needed."""

    parents = {"Global"}

    def __enter__(self) -> "_GlobalOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of fn (convolutions and matmuls, forward and backward), as
    torch.utils.flop_counter counts them: 2 per multiply-add."""
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        fn()
    return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rate(fn: Callable[[], Any], flops: float, device: torch.device, reps: int) -> float:
    """FLOP/s of fn: the best of three timed runs of `reps` calls after one warm-up call (the best,
    not the mean, so load from other jobs counts less)."""
    fn()  # library initialisation, GPU clocks
    sync(device)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return flops / best


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int = 0) -> float:
    """The machine's matmul FLOP/s for `dtype`: a large square GEMM of side n through torch.mm (0:
    8192 on GPU, 2048 on CPU). On CPU also the same kind of GEMM through oneDNN (a 1x1 convolution
    of n/2 channels, NHWC), the library the step's convolutions run in, and the faster of the two:
    on AMD CPUs MKL's sgemm takes a path about half as fast as oneDNN's. A smaller n only tests
    the code (gpu_check's dry run): the peak it measures is lower."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    peak = _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n ** 3, device, 20 if device.type == "cuda" else 3)
    if device.type == "cpu":
        c, hw, batch = n // 2, 16, 64
        x = torch.randn(batch, c, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 1, 1, dtype=dtype).contiguous(memory_format=torch.channels_last)
        peak = max(peak, _best_rate(lambda: torch.nn.functional.conv2d(x, w), 2.0 * batch * hw * hw * c * c,
                                    device, 3))
    return peak


def conv_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a 3x3 convolution of ResNet-18's size (256 channels, 16x16, NHWC): the best a
    dense kernel of the step itself reaches, beside the GEMM peak."""
    c, hw, batch = 256, 16, 128
    x = torch.randn(batch, c, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return _best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2.0 * batch * hw * hw * c * c * 9,
                      device, 20 if device.type == "cuda" else 3)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """GPU: torch.cuda.max_memory_allocated since the last reset; CPU: this process's max RSS
    (over its whole life: it only grows from one method to the next)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def time_breakdown(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """One call of fn under torch.profiler: wall seconds, and the shares of it spent in dense ops
    (convolution / matmul kernels, forward and backward), in the other ops (BN, activations,
    elementwise, optimiser) and outside any op (Python, autograd bookkeeping, launch overhead).
    On GPU the op times are device (kernel) times."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    dense = other = 0.0
    top: list[tuple[str, float]] = []
    for ev in prof.key_averages():
        us = (ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total)
        if us <= 0 or not ev.key.startswith("aten::"):
            continue
        name = ev.key[len("aten::"):]
        if any(k in name for k in DENSE_OPS):
            dense += us
        else:
            other += us
        top.append((name, us / 1e6))
    top.sort(key=lambda kv: -kv[1])
    dense, other = dense / 1e6, other / 1e6
    return {"wall_s": wall, "dense_share": dense / wall, "other_ops_share": other / wall,
            "outside_ops_share": max(0.0, 1.0 - (dense + other) / wall),
            "top_ops": [[k, round(v, 4)] for k, v in top[:8]]}
