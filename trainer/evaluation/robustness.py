"""Reporting attacks: clean accuracy, PGD-20 (our engine) and AutoAttack (torchattacks)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from trainer.adversarial_training import ce_objective
from trainer.attacks import PGDConfig, network_mode, pgd_attack


def pgd_config(eval_pgd: Mapping[str, Any]) -> PGDConfig:
    return PGDConfig(eps=float(eval_pgd["eps"]), alpha=float(eval_pgd["alpha"]), steps=int(eval_pgd["steps"]),
                     norm=eval_pgd.get("norm", "linf"))


def clean_and_pgd_counts(model: nn.Module, loader: Iterable, attack: PGDConfig) -> dict[str, float]:
    """Correct counts on clean and PGD inputs over this rank's batches (model in eval mode)."""
    clean = robust = total = 0
    with network_mode([model], train=False):
        for batch in loader:
            x, y = batch["views"][0], batch["label"]
            with torch.no_grad():
                clean += (model(x).argmax(1) == y).sum().item()
            x_adv = pgd_attack(x, ce_objective(model, y), attack)
            with torch.no_grad():
                robust += (model(x_adv).argmax(1) == y).sum().item()
            total += y.shape[0]
    return {"clean_correct": clean, "pgd_correct": robust, "total": total}


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, num_classes: int,
                        version: str = "standard", batch_size: int = 256, seed: int = 0) -> float:
    """Robust accuracy under AutoAttack (APGD-CE, APGD-T, FAB-T, Square for 'standard')."""
    import torchattacks

    with network_mode([model], train=False):
        attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version=version,
                                         n_classes=num_classes, seed=seed)
        correct = 0
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            x_adv = attack(xb, yb)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == yb).sum().item()
    return correct / max(1, y.shape[0])
