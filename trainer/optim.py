"""Optimisers (SGD, LARS) and per-step learning-rate schedules (linear warm-up + cosine/step)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS (You et al.) as in SimCLR/ACL: SGD-momentum with a layer-wise trust ratio.

    Biases and BN parameters (1-d tensors) are excluded from weight decay and adaptation.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.norm(p), torch.norm(g)
                    trust = torch.where((p_norm > 0) & (g_norm > 0), group["eta"] * p_norm / g_norm,
                                        torch.ones_like(p_norm))
                    g = g.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def scaled_lr(train_cfg: Mapping[str, Any]) -> float:
    lr = float(train_cfg["lr"])
    if train_cfg.get("lr_scaling", "linear") == "linear":
        lr *= int(train_cfg["batch_size"]) / 256
    return lr


def build_optimizer(params: Iterable[nn.Parameter], train_cfg: Mapping[str, Any],
                    lr: float | None = None) -> torch.optim.Optimizer:
    lr = scaled_lr(train_cfg) if lr is None else lr
    params = [p for p in params if p.requires_grad]
    wd, mom = float(train_cfg.get("weight_decay", 0.0)), float(train_cfg.get("momentum", 0.9))
    if train_cfg["optimizer"] == "lars":
        return LARS(params, lr=lr, momentum=mom, weight_decay=wd)
    fused = train_cfg.get("fused", "auto")  # auto: the fused kernel where this torch has one
    if fused in ("auto", True) and params:
        try:  # one kernel per parameter (CUDA and, since torch 2.4, CPU); same arithmetic as the loop
            return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd, fused=True)
        except (RuntimeError, ValueError, TypeError):
            if fused is True:
                raise
    return torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: Mapping[str, Any],
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: linear warm-up, then cosine to 0, step decay (÷10 at milestones) or constant."""
    total = int(train_cfg["epochs"]) * steps_per_epoch
    warm = int(train_cfg.get("warmup_epochs", 0)) * steps_per_epoch
    kind = train_cfg.get("schedule", "cosine")
    milestones = [int(m) * steps_per_epoch for m in train_cfg.get("milestones", [])]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "step":
            return 0.1 ** sum(step >= m for m in milestones)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
