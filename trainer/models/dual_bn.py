"""Dual batch norm (ACL-DS): every BN has a `normal` and a `pgd` copy, picked per forward.

The route is a plain attribute on each DualBatchNorm, set for the whole model with the
`bn_route(model, "pgd")` context manager, so attack code and loss code select the same set.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

ROUTES = ("normal", "pgd")


class DualBatchNorm(nn.Module):
    """Two independent BatchNorm layers of the same shape; `route` chooses which one runs."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        self.normal = bn
        self.pgd = copy.deepcopy(bn)
        self.route = "normal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normal(x) if self.route == "normal" else self.pgd(x)


def make_dual_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d/2d inside `module` (in place) by a DualBatchNorm."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)):
            setattr(module, name, DualBatchNorm(child))
        else:
            make_dual_bn(child)
    return module


def has_dual_bn(module: nn.Module) -> bool:
    return any(isinstance(m, DualBatchNorm) for m in module.modules())


@contextlib.contextmanager
def bn_route(module: nn.Module, route: str) -> Iterator[None]:
    """Route every DualBatchNorm in `module` to `route` inside the block (no-op without dual BN)."""
    if route not in ROUTES:
        raise ValueError(f"bn route must be one of {ROUTES}, got {route!r}")
    duals = [m for m in module.modules() if isinstance(m, DualBatchNorm)]
    previous = [m.route for m in duals]
    for m in duals:
        m.route = route
    try:
        yield
    finally:
        for m, r in zip(duals, previous):
            m.route = r


def convert_dual_bn_to_single(module: nn.Module, route: str = "pgd") -> nn.Module:
    """Return a deep copy of `module` with each DualBatchNorm replaced by its `route` BN.

    ACL fine-tunes and evaluates from the `pgd` BN set loaded into a single-BN network.
    """
    if route not in ROUTES:
        raise ValueError(f"bn route must be one of {ROUTES}, got {route!r}")
    module = copy.deepcopy(module)

    def _swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, DualBatchNorm):
                setattr(parent, name, getattr(child, route))
            else:
                _swap(child)

    _swap(module)
    return module


def single_bn_state_dict(state: dict[str, torch.Tensor], route: str = "pgd") -> dict[str, torch.Tensor]:
    """Map a dual-BN state dict to single-BN keys (`...bn1.pgd.weight` -> `...bn1.weight`)."""
    other = "normal" if route == "pgd" else "pgd"
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if other in parts[:-1]:
            continue
        out[".".join(p for i, p in enumerate(parts) if not (p == route and i < len(parts) - 1))] = value
    return out
