"""Projected gradient descent (L-inf and L2) that maximises an arbitrary objective.

Callers pass `objective(x_adv) -> per-example or scalar loss to MAXIMISE`; the engine owns the
random start, the step, the projection and the [0, 1] clip. The start follows the references:
`random_start` (false: delta = 0, the empirical study), `start` (uniform U(-eps, eps) or TRADES'
x + 0.001 N(0, 1)) and `clamp_start` (RoCL clips x + delta to [0, 1] before the first gradient;
ACL, DeACL and TRADES do not, so a pixel at 0 or 1 can start outside the box). Gradients are taken only with
respect to the input (`torch.autograd.grad`), so parameter `.grad` is never touched and no
weight-gradient kernels run (checked in tests/test_perf.py: every convolution/BN backward
of an attack step computes the input gradient only). The networks' train/eval mode during the
attack is explicit (`network_mode`), because every paper states it. `frozen_parameters`
additionally stops autograd from recording parameter edges at all during the attack (less
graph bookkeeping and fewer saved activations; under torch.compile it is what keeps the
compiled backward from computing weight gradients).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

Objective = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PGDConfig:
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    norm: str = "linf"  # "linf" or "l2"
    random_start: bool = True
    # "uniform": U(-eps, eps) (Madry, ACL, DeACL); "normal": x + 0.001 N(0,1) (TRADES).
    start: str = "uniform"
    # Clip the random start to [0, 1] before the first gradient (RoCL); ACL, DeACL, TRADES do not.
    clamp_start: bool = False

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError(f"attack eps must be >= 0, got {self.eps}")
        if self.steps < 0:
            raise ValueError(f"attack steps must be >= 0, got {self.steps}")
        if self.norm not in ("linf", "l2"):
            raise ValueError(f"attack norm must be 'linf' or 'l2', got {self.norm!r}")
        if self.start not in ("uniform", "normal"):
            raise ValueError(f"attack start must be 'uniform' or 'normal', got {self.start!r}")


START_KEYS = ("random_start", "start", "clamp_start")


def pgd_config(section: Mapping[str, Any], **changes: Any) -> PGDConfig:
    """The engine's settings from an attack-shaped config section (attack, eval.pgd, monitor.val_attack)."""
    start = {k: section[k] for k in START_KEYS if k in section}
    cfg = PGDConfig(eps=float(section["eps"]), alpha=float(section["alpha"]), steps=int(section["steps"]),
                    norm=section["norm"], **start)
    return replace(cfg, **changes) if changes else cfg


def merged_attack(section: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `attack` group's section with a method's non-null `method.attack` keys in its place."""
    return {**section, **{k: v for k, v in (overrides or {}).items() if v is not None}}


@contextlib.contextmanager
def network_mode(modules: Iterable[nn.Module], train: bool) -> Iterator[None]:
    """Put `modules` in train/eval mode for the block, then restore each submodule's mode."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in {id(m): m for m, _ in saved}.values():
        module.train(train)
    try:
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


@contextlib.contextmanager
def frozen_parameters(modules: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Set requires_grad=False on every parameter of `modules` that has it, for the block only.

    Exactly the parameters that required grad before get it back, also when the block raises,
    so frozen helpers (a teacher) stay frozen and DDP's parameter set is unchanged.
    """
    if not enabled:
        yield
        return
    params = list({id(p): p for module in modules for p in module.parameters() if p.requires_grad}.values())
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def random_start(x: torch.Tensor, cfg: PGDConfig) -> torch.Tensor:
    """The first iterate: x, x + U(-eps, eps) (L-inf; L2: a random point of the ball) or x + 0.001 N(0, 1),
    clipped to [0, 1] only with `clamp_start` (no projection: the references do not project it)."""
    if not cfg.random_start or cfg.eps == 0:
        return x.clone()
    if cfg.start == "normal":
        start = x + 0.001 * torch.randn_like(x)
    elif cfg.norm == "linf":
        start = x + torch.empty_like(x).uniform_(-cfg.eps, cfg.eps)
    else:
        delta = torch.randn_like(x)
        norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        radius = torch.rand(x.shape[0], *[1] * (x.dim() - 1), device=x.device, dtype=x.dtype)
        start = x + delta / norms.clamp_min(1e-12) * radius * cfg.eps
    return start.clamp(0.0, 1.0) if cfg.clamp_start else start


def _project(x_adv: torch.Tensor, x: torch.Tensor, cfg: PGDConfig) -> torch.Tensor:
    delta = x_adv - x
    if cfg.norm == "linf":
        delta = delta.clamp(-cfg.eps, cfg.eps)
    else:
        norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
        delta = delta * (cfg.eps / norms.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def pgd_attack(x: torch.Tensor, objective: Objective, cfg: PGDConfig) -> torch.Tensor:
    """Return x_adv within the cfg.eps ball of x (and [0, 1]) that increases `objective`.

    `objective` returns a loss to maximise (a scalar, or one value per example: it is summed,
    so each example's ascent direction is independent of the batch size). Put the networks in
    the mode the method wants with `network_mode(...)` around this call.
    """
    x = x.detach()
    if cfg.steps == 0 or cfg.eps == 0:
        return x.clone()
    x_adv = random_start(x, cfg).detach()
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = objective(x_adv)
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        with torch.no_grad():
            if cfg.norm == "linf":
                step = cfg.alpha * grad.sign()
            else:
                g_norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
                step = cfg.alpha * grad / g_norm.clamp_min(1e-12)
            x_adv = _project(x_adv.detach() + step, x, cfg)
    return x_adv.detach()
