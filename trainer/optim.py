"""Optimisers (SGD, LARS) and per-step learning-rate schedules (linear warm-up + cosine/step)."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS (You et al.): SGD-momentum with a layer-wise trust ratio, in each reference's form.

    Per parameter w with gradient g and weight decay wd (`method.train.lars`):
    - trust_norm="sum": trust = eta |w| / (|g| + wd |w| + eps), g' = trust (g + wd w)
      (torchlars, RoCL's optimiser; ACL's optimizer/lars.py with eps 0; solo-learn's LARSWrapper);
      "combined": trust = eta |w| / |g + wd w| (SimCLR's TF LARS); trust = 1 where |w| or |g| is 0
      or below `zero_threshold` (ACL: 1e-15);
    - exclude_1d: 1-d tensors (biases, BN) keep g' = g, without trust ratio or weight decay
      (SimCLR's TF code, solo-learn); false: every parameter is adapted (ACL, torchlars);
    - clip (solo-learn): trust = min(trust / lr, 1);
    - lr_in_momentum (ACL, SimCLR's "classic momentum"): buf = m buf + lr g', w -= buf;
      otherwise torch SGD's: buf = m buf + g', w -= lr buf (the first buf is g').
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, trust_norm: str = "sum", eps: float = 1e-8, exclude_1d: bool = False,
                 clip: bool = False, lr_in_momentum: bool = False, zero_threshold: float = 0.0) -> None:
        if trust_norm not in ("sum", "combined"):
            raise ValueError(f"LARS trust_norm must be 'sum' or 'combined', got {trust_norm!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      trust_norm=trust_norm, eps=eps, exclude_1d=exclude_1d, clip=clip,
                                      lr_in_momentum=lr_in_momentum, zero_threshold=zero_threshold))

    @staticmethod
    def scaled_grad(p: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor:
        """g' = trust * (g + wd w) (or g itself for an excluded 1-d parameter)."""
        g, wd = p.grad, float(group["weight_decay"])
        if group["exclude_1d"] and p.ndim == 1:
            return g
        g_wd = g.add(p, alpha=wd) if wd else g
        p_norm = torch.norm(p)
        g_norm = torch.norm(g_wd if group["trust_norm"] == "combined" else g)
        denom = g_norm if group["trust_norm"] == "combined" else g_norm + wd * p_norm + group["eps"]
        ratio = group["eta"] * p_norm / denom
        if group["clip"]:
            ratio = torch.clamp(ratio / group["lr"], max=1.0)
        thr = group["zero_threshold"]
        adapt = (p_norm > 0) & (g_norm > 0) & (p_norm >= thr) & (g_norm >= thr)
        return g_wd.mul(torch.where(adapt, ratio, torch.ones_like(p_norm)))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = self.scaled_grad(p, group)
                if group["lr_in_momentum"]:
                    g = g.mul(group["lr"])
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.clone(g).detach()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-1.0 if group["lr_in_momentum"] else -group["lr"])
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
        return LARS(params, lr=lr, momentum=mom, weight_decay=wd, **dict(train_cfg.get("lars") or {}))
    if train_cfg["optimizer"] == "adam":  # torch's defaults (betas 0.9, 0.999; eps 1e-8), as the study
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
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
