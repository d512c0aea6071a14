"""Supervised objectives shared by the supervised method and the evaluation heads.

`supervised_loss(kind, ...)` is the one dispatch over them:
- ce: cross-entropy on clean images;
- pgd_at (Madry et al.): CE on PGD examples that maximise CE;
- trades (Zhang et al.): CE(clean) + beta * KL(p_clean || p_adv), the attack maximising the KL
  from a x + 0.001 N(0,1) start.
Both attacks run with the model in eval mode (as the references do).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.attacks import PGDConfig, network_mode, pgd_attack
from trainer.losses import trades_kl


SUPERVISED_LOSSES = ("ce", "pgd_at", "trades")


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


def supervised_loss(kind: str, model: nn.Module, train_net: Callable[[torch.Tensor], torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor, attack: PGDConfig,
                    beta: float = 6.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of `kind`; the logits are on the adversarial batch for pgd_at, else clean.

    `model` is attacked (eval mode, no DDP), `train_net` is the forward that trains (DDP-wrapped).
    """
    if kind == "ce":
        logits = train_net(x).float()
        return F.cross_entropy(logits, y), logits
    if kind == "pgd_at":
        return pgd_at_loss(model, train_net, x, y, attack)
    if kind == "trades":
        return trades_loss(model, train_net, x, y, attack, beta)
    raise ValueError(f"supervised loss {kind!r} is not known; allowed: {', '.join(SUPERVISED_LOSSES)}")
