"""Supervised adversarial objectives shared by methods and evaluation protocols.

PGD-AT (Madry et al.): CE on PGD examples that maximise CE.
TRADES (Zhang et al.): CE(clean) + beta * KL(p_clean || p_adv), attack maximises the KL from
a x + 0.001 N(0,1) start. Both attack with the model in eval mode (as the references do).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.attacks import PGDConfig, network_mode, pgd_attack
from trainer.losses import trades_kl


def ce_objective(model: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor):
    return lambda xa: F.cross_entropy(model(xa).float(), y, reduction="none")


def pgd_at_loss(model: nn.Module, train_net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, attack: PGDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, logits on adversarial examples). `model` attacks, `train_net` trains (DDP)."""
    with network_mode([model], train=False):
        x_adv = pgd_attack(x, ce_objective(model, y), attack)
    logits = train_net(x_adv)
    return F.cross_entropy(logits.float(), y), logits


def trades_loss(model: nn.Module, train_net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, attack: PGDConfig, beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (TRADES loss, clean logits). One concatenated forward for clean + adversarial."""
    attack = replace(attack, start="normal")
    with network_mode([model], train=False):
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)
        x_adv = pgd_attack(
            x, lambda xa: F.kl_div(F.log_softmax(model(xa).float(), dim=1), p_clean, reduction="none").sum(1),
            attack)
    b = x.shape[0]
    logits = train_net(torch.cat([x, x_adv])).float()
    loss = F.cross_entropy(logits[:b], y) + beta * trades_kl(logits[b:], logits[:b])
    return loss, logits[:b]
