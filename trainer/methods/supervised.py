"""Supervised baselines: standard CE, PGD-AT (Madry et al.), TRADES (Zhang et al., beta=6).

The trainable module is `ClassifierEncoder`: the encoder plus a linear head. It is what the
worker wraps for DDP and what the optimiser sees (`method.encoder.parameters()`); its plain
forward still returns backbone features (kNN monitor), `classify=True` returns logits.
`export_encoder()` returns the head-less Encoder (sharing the same modules), so `model.pt`
loads with `load_encoder` like any other method's; the full module (with head) is what a
resumed run restores (train_loop writes it as `model_full.pt`).

Losses and attacks come from trainer.adversarial_training.supervised_loss. The training attack is the
`attack` group's with `method.attack` on top (10 steps by default, as PGD-AT and TRADES train; set
method.attack.steps=null to follow attack.steps, e.g. in a Tune sweep of it). Reference choices as
keys: `trades_forwards` (TRADES' three train-mode forwards by default), `attack_train_mode` (eval mode
by default; the empirical study's SL attacks in train mode) and `normalize_logits` (the study's SL
trains and attacks L2-normalised logits).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from trainer.adversarial_training import supervised_loss
from trainer.methods.base import Method, register_method
from trainer.models import Encoder


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
        self.loss_kind = method_cfg["loss"]
        self.beta = float(method_cfg["beta"])
        self.encoder = ClassifierEncoder(self.encoder, int(cfg["data"]["num_classes"])).to(device)
        self.net = self.encoder
        self.logits = _Logits(self.encoder)

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (x,) = batch["views"]
        y = batch["label"]
        train_net = lambda xa: self.net(xa, classify=True)  # noqa: E731 - DDP forward
        loss, logits = supervised_loss(self.loss_kind, self.logits, train_net, x, y, self.attack, self.beta,
                                       trades_forwards=self.mcfg["trades_forwards"],
                                       attack_train_mode=bool(self.mcfg["attack_train_mode"]),
                                       normalize_logits="both" if self.mcfg["normalize_logits"] else "none")
        acc = (logits.detach().argmax(1) == y).float().mean()
        # pgd_at returns logits on the adversarial batch, ce/trades on the clean batch.
        return loss, {"loss": loss.detach(), "train_adv_acc" if self.loss_kind == "pgd_at" else "train_acc": acc}

    def export_encoder(self) -> Encoder:
        """The head-less encoder (same parameters), loadable by trainer.checkpoint.load_encoder."""
        return self.encoder.encoder_only()
