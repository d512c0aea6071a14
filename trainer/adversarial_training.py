"""Supervised objectives shared by the supervised method and the evaluation heads.

`supervised_loss(kind, ...)` is the one dispatch over them:
- ce: cross-entropy on clean images;
- pgd_at (Madry et al.): CE on PGD examples that maximise CE;
- trades (Zhang et al.): CE(clean) + beta * KL(p_clean || p_adv), the attack maximising the KL
  from a x + 0.001 N(0,1) start;
- ce_clean_adv (the empirical study's partial / full AT and adversarial SL): CE(x) + CE(PGD(x)).

How the references run them, each a keyword:
- `attack_train_mode`: the attack's BN mode. Eval mode everywhere (Madry, TRADES, DeACL, ACL),
  except the empirical study, whose full-AT and SL attack the network in train mode; None keeps
  the modes the network is in (the study's heads: the modes they train in).
- `trades_forwards`: TRADES' trades.py (and DeACL's copy) runs three train-mode forwards, x, x'
  and x again for the KL target ("three"); ACL's trades.py two, x and x' ("two"); "one" is one
  forward of [x; x'] (BN statistics over both: not a reference's). With BN in train mode these give
  different batch statistics, losses, gradients and running statistics; with BN in eval mode (a
  frozen encoder in eval mode and a linear head) they are the same, so one forward is used there.
  ce_clean_adv runs x then x' as separate forwards (the study) unless "one".
- `normalize_logits`: "attack" (the study's EvalNet returns F.normalize(logits): its attacks
  maximise CE of unit-norm logits while its heads train on raw logits), "both" (the study's SL
  also trains on them) or "none".
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.attacks import PGDConfig, network_mode, pgd_attack
from trainer.losses import at_least_fp32, trades_kl


SUPERVISED_LOSSES = ("ce", "pgd_at", "trades", "ce_clean_adv")
Logits = Callable[[torch.Tensor], torch.Tensor]


def ce_objective(model: Logits, y: torch.Tensor):
    return lambda xa: F.cross_entropy(at_least_fp32(model(xa)), y, reduction="none")


def normalized(model: Logits) -> Logits:
    """logits / |logits| (the study's EvalNet: F.normalize(head(encoder(x)), dim=1))."""
    return lambda x: F.normalize(at_least_fp32(model(x)), dim=1)


def uses_batch_statistics(module: Callable) -> bool:
    """Whether a forward of `module` normalises with batch statistics (a BN in train mode)."""
    return isinstance(module, nn.Module) and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())


def attack_modes(model: nn.Module, train: bool | None):
    """`model` in train / eval mode for an attack; None: the modes it is in."""
    return contextlib.nullcontext() if train is None else network_mode([model], train=train)


def ce_adversarial(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: PGDConfig,
                   attack_train_mode: bool | None = False, attacked: Logits | None = None) -> torch.Tensor:
    """PGD examples maximising CE of `attacked` (default: `model`), `model` in eval or train mode."""
    with attack_modes(model, attack_train_mode):
        return pgd_attack(x, ce_objective(attacked or model, y), attack)


def pgd_at_loss(model: nn.Module, train_net: Logits, x: torch.Tensor, y: torch.Tensor, attack: PGDConfig,
                attack_train_mode: bool | None = False, attacked: Logits | None = None,
                loss_net: Logits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, logits on adversarial examples). `model` attacks, `train_net` trains (DDP)."""
    x_adv = ce_adversarial(model, x, y, attack, attack_train_mode, attacked)
    logits = at_least_fp32((loss_net or train_net)(x_adv))
    return F.cross_entropy(logits, y), logits


def ce_clean_adv_loss(model: nn.Module, train_net: Logits, x: torch.Tensor, y: torch.Tensor, attack: PGDConfig,
                      attack_train_mode: bool | None = False, attacked: Logits | None = None,
                      loss_net: Logits | None = None, one_forward: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CE(x) + CE(x') (the study), x' = PGD-CE(x); returns (loss, clean logits)."""
    x_adv = ce_adversarial(model, x, y, attack, attack_train_mode, attacked)
    net = loss_net or train_net
    if one_forward or not uses_batch_statistics(model):
        out = at_least_fp32(net(torch.cat([x, x_adv])))
        clean, adv = out[:x.shape[0]], out[x.shape[0]:]
    else:
        clean, adv = at_least_fp32(net(x)), at_least_fp32(net(x_adv))
    return F.cross_entropy(clean, y) + F.cross_entropy(adv, y), clean


def trades_loss(model: nn.Module, train_net: Logits, x: torch.Tensor, y: torch.Tensor, attack: PGDConfig,
                beta: float = 6.0, forwards: str = "three", attack_train_mode: bool | None = False,
                attacked: Logits | None = None, loss_net: Logits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (TRADES loss, clean logits); `forwards` as the module docstring says."""
    attack = replace(attack, start="normal", random_start=True)
    attacked = attacked or model
    with attack_modes(model, attack_train_mode):
        with torch.no_grad():
            p_clean = F.softmax(at_least_fp32(attacked(x)), dim=1)
        x_adv = pgd_attack(
            x, lambda xa: F.kl_div(F.log_softmax(at_least_fp32(attacked(xa)), dim=1), p_clean, reduction="none").sum(1),
            attack)
    b = x.shape[0]
    net = loss_net or train_net
    if forwards == "one" or not uses_batch_statistics(model):
        logits = at_least_fp32(net(torch.cat([x, x_adv])))
        clean, adv, target = logits[:b], logits[b:], logits[:b]
    else:
        clean, adv = at_least_fp32(net(x)), at_least_fp32(net(x_adv))
        target = at_least_fp32(net(x)) if forwards == "three" else clean
    loss = F.cross_entropy(clean, y) + beta * trades_kl(adv, target)
    return loss, clean


def supervised_loss(kind: str, model: nn.Module, train_net: Logits, x: torch.Tensor, y: torch.Tensor,
                    attack: PGDConfig, beta: float = 6.0, trades_forwards: str = "three",
                    attack_train_mode: bool | None = False, normalize_logits: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of `kind`; the logits are on the adversarial batch for pgd_at, else clean.

    `model` is attacked (no DDP), `train_net` is the forward that trains (DDP-wrapped).
    """
    if kind not in SUPERVISED_LOSSES:
        raise ValueError(f"supervised loss {kind!r} is not known; allowed: {', '.join(SUPERVISED_LOSSES)}")
    attacked = normalized(model) if normalize_logits in ("attack", "both") else model
    loss_net = normalized(train_net) if normalize_logits == "both" else train_net
    if kind == "ce":
        logits = at_least_fp32(loss_net(x))
        return F.cross_entropy(logits, y), logits
    common = dict(attack_train_mode=attack_train_mode, attacked=attacked, loss_net=loss_net)
    if kind == "pgd_at":
        return pgd_at_loss(model, train_net, x, y, attack, **common)
    if kind == "ce_clean_adv":
        return ce_clean_adv_loss(model, train_net, x, y, attack, one_forward=trades_forwards == "one", **common)
    return trades_loss(model, train_net, x, y, attack, beta, trades_forwards, **common)
