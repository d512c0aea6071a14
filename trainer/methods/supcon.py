"""SupCon / SCL (Khosla et al. 2020) as used in the empirical study (Ghofrani et al.).

Two strong views; supervised contrastive loss (T=0.07) with the batch labels (`use_labels`),
or SimCLR's instance positives without them. Negatives gathered across ranks.

`adversarial: true` (its adversarial pre-training, the study's cl_scl_AT.py by default):
x' = PGD on the un-augmented image x (`adv_view: original`, the `three_view` loader's first view;
`first`: the first augmented view) maximising contrastive(x, x'), from delta = 0 with alpha 0.01
(`method.attack`), the network in train mode with separate forwards of x and x + delta at every
step (`attack_train_mode`; the study's pgd_linf). Then
loss = adv_weight * contrastive(x, x') + contrastive(t(x), t'(x)), each of x, x', t(x), t'(x)
through its own train-mode forward, in that order (`separate_forwards`; false: one forward of all).
The standard pre-training also forwards the two views separately by default (cl_scl_ST.py).
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
        self.adv_original = method_cfg["adv_view"] == "original"
        self.attack_train_mode = bool(method_cfg["attack_train_mode"])
        self.separate = bool(method_cfg["separate_forwards"])
        self.views = "three_view" if self.adversarial and self.adv_original else "two_view"

    def _labels(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return batch["label"] if self.use_labels else None

    def _project(self, net: torch.nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Projections of each batch in `xs`: one forward each (separate_forwards) or one of all."""
        if self.separate:
            return [net(x, project=True)[1] for x in xs]
        return list(net(torch.cat(xs), project=True)[1].split([x.shape[0] for x in xs]))

    def make_adversarial(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """x' maximising contrastive(x, x') (negatives from every rank)."""
        enc = self.encoder
        with self.attack_mode(train=self.attack_train_mode):
            z = None
            if not self.attack_train_mode:
                with torch.no_grad():
                    z = enc(x, project=True)[1]

            def objective(xa: torch.Tensor) -> torch.Tensor:
                if z is not None:  # eval mode: x's projection does not change
                    zx, za = z, enc(xa, project=True)[1]
                elif self.separate:  # the study: a train-mode forward of x, then of x + delta, every step
                    with torch.no_grad():
                        zx = enc(x, project=True)[1]
                    za = enc(xa, project=True)[1]
                else:
                    zx, za = enc(torch.cat([x, xa]), project=True)[1].split([x.shape[0], xa.shape[0]])
                return supcon(torch.stack([zx, za], dim=1), labels, self.temperature, gather=self.attack_gather)

            return pgd_attack(x, objective, self.attack)

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1, x2 = batch["views"][-2:]
        labels = self._labels(batch)
        if not self.adversarial:
            z1, z2 = self._project(self.net, [x1, x2])
            loss = supcon(torch.stack([z1, z2], dim=1), labels, self.temperature)
            return loss, {"loss": loss.detach()}
        if self.adv_original:
            x0 = batch["views"][0]
            x_adv = self.make_adversarial(x0, labels)
            z0, za, z1, z2 = self._project(self.net, [x0, x_adv, x1, x2])
        else:
            x_adv = self.make_adversarial(x1, labels)
            z1, za, z2 = self._project(self.net, [x1, x_adv, x2])
            z0 = z1
        loss_adv = supcon(torch.stack([z0, za], dim=1), labels, self.temperature)
        loss_views = supcon(torch.stack([z1, z2], dim=1), labels, self.temperature)
        loss = self.adv_weight * loss_adv + loss_views
        return loss, {"loss": loss.detach(), "loss_adv": loss_adv.detach(), "loss_views": loss_views.detach()}
