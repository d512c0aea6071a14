"""Backbones (CIFAR ResNet-18/50, WRN-34-10), dual batch norm, and projector heads."""
from trainer.models.dual_bn import DualBatchNorm, bn_route, convert_dual_bn_to_single
from trainer.models.encoder import Encoder, build_encoder
from trainer.models.normalize import Normalize, DATASET_STATS

__all__ = [
    "DualBatchNorm",
    "bn_route",
    "convert_dual_bn_to_single",
    "Encoder",
    "build_encoder",
    "Normalize",
    "DATASET_STATS",
]
