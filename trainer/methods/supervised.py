"""Supervised baselines: standard CE, PGD-AT (Madry et al.), TRADES (Zhang et al., beta=6).

The trainable module is `ClassifierEncoder`: the encoder plus a linear head. It is what the
worker wraps for DDP and what the optimiser sees (`method.encoder.parameters()`); its plain
forward still returns backbone features (kNN monitor), `classify=True` returns logits.
`export_encoder()` returns the head-less Encoder (sharing the same modules), so `model.pt`
loads with `load_encoder` like any other method's; the full module (with head) is what a
resumed run restores (train_loop writes it as `model_full.pt`).

Attacks (eval mode) come from trainer.adversarial_training; `attack_steps` overrides the
`attack` group's step count (TRADES and PGD-AT train with 10 steps; null keeps attack.steps).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from trainer.adversarial_training import pgd_at_loss, trades_loss
from trainer.methods.base import Method, register_method
from trainer.models import Encoder

LOSSES = ("ce", "pgd_at", "trades")


class ClassifierEncoder(Encoder):
    """An Encoder with a linear classification head on the pooled backbone feature."""

    def __init__(self, encoder: Encoder, num_classes: int) -> None:
        super().__init__(encoder.backbone, encoder.normalize, encoder.projector)
        self.head = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor, project: bool = False, classify: bool = False):
        if classify:
            return self.head(self.features(x))
        return super().forward(x, project=project)

    def encoder_only(self) -> Encoder:
        return Encoder(self.backbone, self.normalize, self.projector)


class _Logits(nn.Module):
    """Calls the classifier for logits (what the PGD/TRADES objectives attack)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, classify=True)


@register_method("supervised")
class Supervised(Method):
    views = "weak"
    needs_projector = False

    def __init__(self, cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device) -> None:
        super().__init__(cfg, method_cfg, device)
        self.loss_kind = str(method_cfg.get("loss", "ce"))
        self.is_adversarial = self.loss_kind != "ce"
        self.beta = float(method_cfg.get("beta", 6.0))
        steps = method_cfg.get("attack_steps")
        if steps is not None:
            self.attack = replace(self.attack, steps=int(steps))
        self.encoder = ClassifierEncoder(self.encoder, int(cfg["data"]["num_classes"])).to(device)
        self.net = self.encoder
        self.logits = _Logits(self.encoder)

    @classmethod
    def validate_config(cls, method_cfg: Mapping[str, Any], prefix: str) -> None:
        from trainer.config import ConfigError

        loss = method_cfg.get("loss", "ce")
        if loss not in LOSSES:
            raise ConfigError(f"{prefix}.loss={loss!r} is invalid: allowed: {', '.join(LOSSES)}")
        beta = method_cfg.get("beta", 6.0)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 0:
            raise ConfigError(f"{prefix}.beta={beta!r} is invalid: allowed: a number >= 0")
        steps = method_cfg.get("attack_steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ConfigError(f"{prefix}.attack_steps={steps!r} is invalid: allowed: null or an integer >= 1")

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (x,) = batch["views"]
        y = batch["label"]
        train_net = lambda xa: self.net(xa, classify=True)  # noqa: E731 - DDP forward
        if self.loss_kind == "ce":
            logits = train_net(x).float()
            loss = F.cross_entropy(logits, y)
        elif self.loss_kind == "pgd_at":
            loss, logits = pgd_at_loss(self.logits, train_net, x, y, self.attack)
        else:
            loss, logits = trades_loss(self.logits, train_net, x, y, self.attack, self.beta)
        acc = (logits.detach().argmax(1) == y).float().mean()
        # pgd_at returns logits on the adversarial batch, ce/trades on the clean batch.
        return loss, {"loss": loss.detach(), "train_adv_acc" if self.loss_kind == "pgd_at" else "train_acc": acc}

    def export_encoder(self) -> Encoder:
        """The head-less encoder (same parameters), loadable by trainer.checkpoint.load_encoder."""
        return self.encoder.encoder_only()
