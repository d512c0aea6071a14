"""ACL (Jiang et al. 2020): adversarial contrastive learning, variants A2A, A2S and DS.

Attack (all variants): PGD with the one engine maximising NT-Xent (T=0.5) over the global
batch (negatives gathered from every rank, `attack.gather_negatives`), the network in eval mode
(the reference `PGD_contrastive` calls `model.eval()`; flag `attack_train_mode`).

- A2A: both views perturbed jointly; loss NT-Xent(f(x1'), f(x2')). Single BN.
- A2S: only the first view of each pair perturbed; loss NT-Xent(f_pgd(x1'), f_normal(x2)). The
  reference README gives adversarial and standard branches independent BNs, so A2S uses dual BN
  (flag `a2s_dual_bn`).
- DS (dual stream, the paper's best): loss = w_n NT-Xent(f_normal(x1), f_normal(x2))
  + w_p NT-Xent(f_pgd(x1'), f_pgd(x2')) with dual BN (every BN, projector BNs too); the attack
  uses the `pgd` BN set. Evaluation and fine-tuning load the `pgd` set into a single-BN network
  (`export_encoder`).

Both streams run inside ONE call of the DDP-wrapped module (`_Streams`), so DDP sees one forward
per step whichever BN sets are used.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from trainer.attacks import pgd_attack
from trainer.losses import nt_xent
from trainer.methods.base import Method, register_method
from trainer.models import Encoder
from trainer.models.dual_bn import DualBatchNorm, bn_route, convert_dual_bn_to_single


class _Streams(nn.Module):
    """Projections of a clean batch through the `normal` BN set and an adversarial batch through
    the `pgd` set, in one module call (the one DDP wraps). Either input may be None."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, normal: torch.Tensor | None = None,
                pgd: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        z_normal = z_pgd = None
        if normal is not None:
            with bn_route(self.encoder, "normal"):
                z_normal = self.encoder(normal, project=True)[1]
        if pgd is not None:
            with bn_route(self.encoder, "pgd"):
                z_pgd = self.encoder(pgd, project=True)[1]
        return z_normal, z_pgd


@register_method("acl")
class ACL(Method):
    views = "two_view"
    uses_dual_bn = True  # per instance: False for A2A (and A2S with a2s_dual_bn=false)

    def __init__(self, cfg: Mapping[str, Any], method_cfg: Mapping[str, Any], device: torch.device) -> None:
        self.variant = method_cfg["variant"]
        self.uses_dual_bn = self.variant == "ds" or (self.variant == "a2s" and method_cfg["a2s_dual_bn"])
        super().__init__(cfg, method_cfg, device)
        self.temperature = float(method_cfg["temperature"])
        self.w_normal, self.w_pgd = (float(w) for w in method_cfg["stream_weights"])
        self.attack_train_mode = bool(method_cfg["attack_train_mode"])
        self.streams = _Streams(self.encoder)
        self.net = self.streams
        # Outside training steps (kNN monitor, direct calls) the encoder uses the `pgd` BN set,
        # the one that is exported for evaluation. Training steps route explicitly.
        for m in self.encoder.modules():
            if isinstance(m, DualBatchNorm):
                m.route = "pgd"

    def parallelize(self, wrap) -> None:
        self.net = wrap(self.streams)

    def _project(self, x: torch.Tensor, route: str) -> torch.Tensor:
        with bn_route(self.encoder, route):
            return self.encoder(x, project=True)[1]

    def make_adversarial(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adversarial views (x1', x2'); for A2S x2 is returned unchanged (the same tensor)."""
        b = x1.shape[0]
        t = self.temperature
        with self.attack_mode(train=self.attack_train_mode):
            if self.variant == "a2s":
                with torch.no_grad():
                    z2 = self._project(x2, "normal")  # the clean partner: fixed during the attack

                def objective(xa: torch.Tensor) -> torch.Tensor:
                    return nt_xent(self._project(xa, "pgd"), z2, t, gather=self.attack_gather)

                return pgd_attack(x1, objective, self.attack), x2

            def joint(xa: torch.Tensor) -> torch.Tensor:
                z = self._project(xa, "pgd")
                return nt_xent(z[:b], z[b:], t, gather=self.attack_gather)

            x_adv = pgd_attack(torch.cat([x1, x2]), joint, self.attack)
        return x_adv[:b], x_adv[b:]

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1, x2 = batch["views"]
        b = x1.shape[0]
        t = self.temperature
        x1_adv, x2_adv = self.make_adversarial(x1, x2)
        if self.variant == "a2a":
            _, z = self.net(pgd=torch.cat([x1_adv, x2_adv]))
            loss = nt_xent(z[:b], z[b:], t)
            return loss, {"loss": loss.detach()}
        if self.variant == "a2s":
            if self.uses_dual_bn:
                z_clean, z_adv = self.net(normal=x2, pgd=x1_adv)
            else:  # single BN: one forward, shared BN statistics
                _, z = self.net(pgd=torch.cat([x1_adv, x2]))
                z_adv, z_clean = z[:b], z[b:]
            loss = nt_xent(z_adv, z_clean, t)
            return loss, {"loss": loss.detach()}
        z_normal, z_pgd = self.net(normal=torch.cat([x1, x2]), pgd=torch.cat([x1_adv, x2_adv]))
        loss_normal = nt_xent(z_normal[:b], z_normal[b:], t)
        loss_pgd = nt_xent(z_pgd[:b], z_pgd[b:], t)
        loss = self.w_normal * loss_normal + self.w_pgd * loss_pgd
        return loss, {"loss": loss.detach(), "loss_normal": loss_normal.detach(),
                      "loss_pgd": loss_pgd.detach()}

    def export_encoder(self) -> Encoder:
        """Single-BN encoder carrying the `pgd` BN set (ACL fine-tunes/evaluates from it)."""
        if self.uses_dual_bn:
            return convert_dual_bn_to_single(self.encoder, "pgd")
        return self.encoder
