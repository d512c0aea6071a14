"""Encoder = Normalize -> backbone -> pooled feature, plus an optional projector MLP.

Everything a method or evaluation needs from a network goes through this one class:
`features(x)` (backbone output, used by DeACL and linear evaluation), `project(h)`
(projector, used by contrastive losses) and `layer_features(x)` (CKA / layer probes).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from trainer.models.dual_bn import make_dual_bn
from trainer.models.normalize import DATASET_STATS, Normalize
from trainer.models.resnet import build_backbone


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """SimCLR's 2-layer MLP projector with BN (BN gets a dual copy under dual BN)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, normalize: Normalize, projector: nn.Module | None) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.projector = projector
        self.feature_dim: int = backbone.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            raise RuntimeError("this encoder was built without a projector")
        return self.projector(h)

    def forward(self, x: torch.Tensor, project: bool = False):
        """Backbone features [B, feature_dim]; with project=True, (features, projection).

        Methods call the network through this forward so that DDP sees every parameter used.
        """
        h = self.features(x)
        return (h, self.project(h)) if project else h

    def layer_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.forward_layers(self.normalize(x))


def build_encoder(model_cfg: Mapping[str, Any], dataset_stats: str = "none",
                  with_projector: bool = True, dual_bn: bool = False) -> Encoder:
    """Build an encoder from the `model` config group (arch, width, stem_padding, projector dims)."""
    backbone = build_backbone(model_cfg["arch"], int(model_cfg.get("width", 64)),
                              int(model_cfg.get("stem_padding", 1)))
    mean, std = DATASET_STATS[dataset_stats]
    projector = None
    if with_projector:
        projector = build_projector(backbone.feature_dim, int(model_cfg.get("proj_hidden_dim", 2048)),
                                    int(model_cfg.get("proj_output_dim", 128)))
    enc = Encoder(backbone, Normalize(mean, std), projector)
    if dual_bn:
        make_dual_bn(enc)
    return enc
