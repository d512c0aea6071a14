"""SupCon / SCL (Khosla et al. 2020) as used in the empirical study (Ghofrani et al.).

Two strong views; supervised contrastive loss (T=0.07) with the batch labels (`use_labels`),
or SimCLR's instance positives without them. Negatives gathered across ranks.

`adversarial: true` (its adversarial pre-training): x1' = PGD (the `attack` group, PGD-5) on
view x1 maximising contrastive(x1, x1') with the network in eval mode; then
loss = contrastive(x1, x1') + contrastive(x1, x2) in one forward over [x1; x2; x1'].
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from trainer.attacks import pgd_attack
from trainer.losses import supcon
from trainer.methods.base import Method, register_method


@register_method("supcon")
class SupCon(Method):
    views = "two_view"

    def __init__(self, cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device) -> None:
        super().__init__(cfg, method_cfg, device)
        self.temperature = float(method_cfg["temperature"])
        self.use_labels = bool(method_cfg["use_labels"])
        self.adversarial = bool(method_cfg["adversarial"])
        self.adv_weight = float(method_cfg["adv_weight"])

    def _labels(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return batch["label"] if self.use_labels else None

    def make_adversarial(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """x' maximising contrastive(x, x') (eval mode; negatives from every rank)."""
        with self.attack_mode(train=False):
            with torch.no_grad():
                z = self.encoder(x, project=True)[1]

            def objective(xa: torch.Tensor) -> torch.Tensor:
                za = self.encoder(xa, project=True)[1]
                return supcon(torch.stack([z, za], dim=1), labels, self.temperature, gather=self.attack_gather)

            return pgd_attack(x, objective, self.attack)

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1, x2 = batch["views"]
        b = x1.shape[0]
        labels = self._labels(batch)
        if not self.adversarial:
            _, z = self.net(torch.cat([x1, x2]), project=True)
            loss = supcon(torch.stack([z[:b], z[b:]], dim=1), labels, self.temperature)
            return loss, {"loss": loss.detach()}
        x_adv = self.make_adversarial(x1, labels)
        _, z = self.net(torch.cat([x1, x2, x_adv]), project=True)
        z1, z2, za = z[:b], z[b:2 * b], z[2 * b:]
        loss_adv = supcon(torch.stack([z1, za], dim=1), labels, self.temperature)
        loss_views = supcon(torch.stack([z1, z2], dim=1), labels, self.temperature)
        loss = self.adv_weight * loss_adv + loss_views
        return loss, {"loss": loss.detach(), "loss_adv": loss_adv.detach(), "loss_views": loss_views.detach()}
