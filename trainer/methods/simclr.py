"""SimCLR (Chen et al. 2020): NT-Xent between two augmented views, negatives from all ranks.

`separate_forwards` chooses the BatchNorm batches: false (default, SimCLR's TF code) runs one
forward of [x1; x2], so BN statistics are over 2B images; true (solo-learn, which trained DeACL's
published teacher) runs each view through its own train-mode forward, BN statistics per view.
Projector layout: `method.projector` (SimCLR's Linear-BN-ReLU-Linear by default).
"""
from __future__ import annotations

from typing import Any

import torch

from trainer.losses import nt_xent
from trainer.methods.base import Method, register_method


@register_method("simclr")
class SimCLR(Method):
    views = "two_view"

    def training_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x1, x2 = batch["views"]
        b = x1.shape[0]
        if self.mcfg["separate_forwards"]:
            z1, z2 = self.net(x1, project=True)[1], self.net(x2, project=True)[1]
        else:
            _, z = self.net(torch.cat([x1, x2]), project=True)
            z1, z2 = z[:b], z[b:]
        loss = nt_xent(z1, z2, float(self.mcfg["temperature"]))
        return loss, {"loss": loss.detach()}
