"""The method interface: which views it needs, its attack objective, its loss.

A method owns its trainable encoder (`self.encoder`) and any frozen helpers (a teacher).
The worker wraps the encoder for DDP with `parallelize`; the training forward goes through
`self.net` (the DDP wrapper, so gradients are all-reduced), attacks through `self.encoder`
(no parameter gradients are needed, so no DDP bookkeeping).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from trainer.attacks import PGDConfig
from trainer.models import Encoder, build_encoder

METHOD_REGISTRY: dict[str, type["Method"]] = {}


def register_method(name: str) -> Callable[[type["Method"]], type["Method"]]:
    def deco(cls: type["Method"]) -> type["Method"]:
        cls.name = name
        METHOD_REGISTRY[name] = cls
        return cls

    return deco


class Method:
    name: ClassVar[str] = "base"
    views: ClassVar[str] = "two_view"
    uses_dual_bn: ClassVar[bool] = False
    needs_projector: ClassVar[bool] = True
    is_adversarial: ClassVar[bool] = False

    def __init__(self, cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device) -> None:
        self.cfg = cfg
        self.mcfg = method_cfg
        self.device = device
        self.attack = PGDConfig(eps=float(cfg["attack"]["eps"]), alpha=float(cfg["attack"]["alpha"]),
                                steps=int(cfg["attack"]["steps"]), norm=cfg["attack"].get("norm", "linf"))
        self.encoder: Encoder = build_encoder(cfg["model"], cfg["data"]["stats"],
                                              with_projector=self.needs_projector,
                                              dual_bn=self.uses_dual_bn).to(device)
        self.net: nn.Module = self.encoder

    @classmethod
    def validate_config(cls, method_cfg: Mapping[str, Any], prefix: str) -> None:
        """Raise trainer.config.ConfigError for method-specific bad values."""

    def parallelize(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = wrap(self.encoder)

    def modules_to_checkpoint(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder}

    def train(self) -> None:
        self.encoder.train()

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (loss to backpropagate, metrics as detached 0-d tensors — no host syncs)."""
        raise NotImplementedError

    def export_encoder(self) -> Encoder:
        """The single-BN encoder that evaluation and fine-tuning use."""
        return self.encoder


def build_method(cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device,
                 **kwargs: Any) -> Method:
    name = method_cfg["name"]
    if name not in METHOD_REGISTRY:
        raise ValueError(f"method.name={name!r} is not known; allowed: {', '.join(sorted(METHOD_REGISTRY))}")
    return METHOD_REGISTRY[name](cfg, method_cfg, device, **kwargs)
