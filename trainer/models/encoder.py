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


DEFAULT_PROJECTOR = {"layers": 2, "bn": "hidden", "bias": "last"}  # SimCLR's: Linear-BN-ReLU-Linear


def projector_spec(model_cfg: Mapping[str, Any], projector: Mapping[str, Any] | None,
                   feature_dim: int) -> dict[str, Any]:
    """The projector's resolved layout: layers, widths (numbers), bn, bias.

    `projector` is a method's `projector` section (null widths: the model's proj_hidden_dim /
    proj_output_dim; "feature": the backbone's feature width); None: SimCLR's layout.
    """
    p = {**DEFAULT_PROJECTOR, **{k: v for k, v in (projector or {}).items() if v is not None}}

    def width(key: str, model_key: str, default: int) -> int:
        value = p.get(key)
        if value == "feature":
            return feature_dim
        return int(value) if value is not None else int(model_cfg.get(model_key, default))

    return {"layers": int(p["layers"]), "hidden_dim": width("hidden_dim", "proj_hidden_dim", 2048),
            "output_dim": width("output_dim", "proj_output_dim", 128), "bn": p["bn"], "bias": p["bias"]}


def build_projector(in_dim: int, spec: Mapping[str, Any]) -> nn.Module:
    """An MLP of `spec["layers"]` Linear layers with ReLU between them; BatchNorm1d after the hidden
    ones (bn=hidden), after all (bn=all: ACL) or none; biases on the last, first, all or no layers.
    Under dual BN every BatchNorm1d here gets its dual copy too."""
    n = int(spec["layers"])
    dims = [in_dim] + [int(spec["hidden_dim"])] * (n - 1) + [int(spec["output_dim"])]
    bias = {"last": {n - 1}, "first": {0}, "all": set(range(n)), "none": set()}[spec["bias"]]
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=i in bias))
        if spec["bn"] == "all" or (spec["bn"] == "hidden" and i < n - 1):
            layers.append(nn.BatchNorm1d(dims[i + 1]))
        if i < n - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, normalize: Normalize, projector: nn.Module | None,
                 projector_spec: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.projector = projector
        self.feature_dim: int = backbone.feature_dim
        # the projector's resolved layout: saved with the model so that load_encoder rebuilds it
        self.projector_spec = dict(projector_spec) if projector is not None and projector_spec else None

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
                  with_projector: bool = True, dual_bn: bool = False,
                  projector: Mapping[str, Any] | None = None) -> Encoder:
    """Build an encoder from the `model` config group (arch, width, stem_padding, projector widths)
    and a method's `projector` layout (None: the layout saved in `model_cfg["projector"]` by
    save_model, else SimCLR's)."""
    backbone = build_backbone(model_cfg["arch"], int(model_cfg.get("width", 64)),
                              int(model_cfg.get("stem_padding", 1)))
    mean, std = DATASET_STATS[dataset_stats]
    head, spec = None, None
    if with_projector:
        spec = projector_spec(model_cfg, projector if projector is not None else model_cfg.get("projector"),
                              backbone.feature_dim)
        head = build_projector(backbone.feature_dim, spec)
    enc = Encoder(backbone, Normalize(mean, std), head, spec)
    if dual_bn:
        make_dual_bn(enc)
    return enc
