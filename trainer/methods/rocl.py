"""RoCL (Kim et al. 2020): robust contrastive learning with instance-wise attacks.

Views (`three_view` loader): [original x, t(x), t'(x)]; the original is not used in training
(the reference loader yields it too and ignores it).
Attack: perturb t(x) to maximise NT-Xent(t(x)+delta, t'(x)), network in eval mode (reference
`RepresentationAdv.get_loss`, attack_to=other). The reference's attack is the method's default
(`method.attack`): eps 0.0314, alpha 0.007, 7 steps, the random start clipped to [0, 1], negatives
from this GPU's batch only.
Loss: NT-Xent over [t(x); t'(x); t(x)_adv] with all three views of an image positives of each
other, + (1/lambda) NT-Xent(t(x)_adv, t'(x)) (regularize_to=other), lambda=256. The reference
computes the 1/lambda term inside get_loss from its own train-mode forward of [t_adv; t'], before
the main forward of [t; t'; t_adv], and over this GPU's batch only (`separate_forwards`,
`reg_gather_negatives`).
Reference quirks kept as flags: `detach_right` (similarities against a detached right operand,
also inside the attack) and `sum_positives` (the reference sums the two positives' terms).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from trainer.attacks import pgd_attack
from trainer.losses import multi_positive_nt_xent, rocl_loss
from trainer.methods.base import Method, register_method


@register_method("rocl")
class RoCL(Method):
    views = "three_view"

    def __init__(self, cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device) -> None:
        super().__init__(cfg, method_cfg, device)
        self.temperature = float(method_cfg["temperature"])
        self.lam = float(method_cfg["lam"])
        self.detach_right = bool(method_cfg["detach_right"])
        self.sum_positives = bool(method_cfg["sum_positives"])
        self.separate = bool(method_cfg["separate_forwards"])
        self.reg_gather = bool(method_cfg["reg_gather_negatives"])

    def make_adversarial(self, x_t: torch.Tensor, x_t2: torch.Tensor) -> torch.Tensor:
        """t(x)_adv: t(x) perturbed to maximise NT-Xent(t(x)_adv, t'(x)) (eval mode)."""
        with self.attack_mode(train=False):
            with torch.no_grad():
                z_t2 = self.encoder(x_t2, project=True)[1]  # the target: fixed during the attack

            def objective(xa: torch.Tensor) -> torch.Tensor:
                z = self.encoder(xa, project=True)[1]
                return multi_positive_nt_xent([z, z_t2], self.temperature, gather=self.attack_gather,
                                              detach_right=self.detach_right)

            return pgd_attack(x_t, objective, self.attack)

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _, x_t, x_t2 = batch["views"]
        b = x_t.shape[0]
        x_adv = self.make_adversarial(x_t, x_t2)
        reg = None
        if self.separate:  # the reference's order: the 1/lam term's forward first
            _, z_r = self.net(torch.cat([x_adv, x_t2]), project=True)
            reg = (z_r[:b], z_r[b:])
        _, z = self.net(torch.cat([x_t, x_t2, x_adv]), project=True)
        z_t, z_t2, z_adv = z[:b], z[b:2 * b], z[2 * b:]
        loss = rocl_loss(z_t, z_t2, z_adv, self.temperature, self.lam, detach_right=self.detach_right,
                         sum_positives=self.sum_positives, reg=reg, reg_gather=self.reg_gather)
        with torch.no_grad():
            cos_adv = torch.nn.functional.cosine_similarity(z_adv, z_t).mean()
        return loss, {"loss": loss.detach(), "cos_adv_clean": cos_adv}
