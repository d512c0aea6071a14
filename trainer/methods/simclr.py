"""SimCLR (Chen et al. 2020): NT-Xent between two augmented views, negatives from all ranks."""
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
        # One forward over both views: BN statistics over 2B images, as SimCLR implementations do.
        _, z = self.net(torch.cat([x1, x2]), project=True)
        loss = nt_xent(z[:b], z[b:], float(self.mcfg["temperature"]))
        return loss, {"loss": loss.detach()}
