"""Cross-rank helpers every layer may use: which rank this is, gathering and all-reducing.

All of them are no-ops in a single process (no torch.distributed process group), so losses,
monitors and evaluation run the same code on one CPU and on N GPUs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class WorkerContext:
    """Where this process runs: its rank among `world_size`, its device and CPU threads."""

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


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, keeping the autograd graph (no-op alone)."""
    if not initialized():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_plain(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 without autograd (labels, counts)."""
    if not initialized():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def rank_offset(local_batch: int) -> int:
    """Global index of this rank's first example when every rank holds `local_batch`."""
    return dist.get_rank() * local_batch if dist.is_available() and dist.is_initialized() else 0


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
    """Sum counts across ranks (float64, one collective)."""
    keys = sorted(values)
    stacked = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    if ctx.distributed and dist.is_initialized():
        dist.all_reduce(stacked)
    return dict(zip(keys, stacked.cpu().tolist()))
