"""Synchronised batch norm that also works on CPU (gloo).

torch.nn.SyncBatchNorm refuses CPU tensors, so `cluster.sync_bn` on a CPU cluster uses
CollectiveBatchNorm; on CUDA, torch's own kernel is used.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn



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
