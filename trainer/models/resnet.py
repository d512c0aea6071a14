"""CIFAR-style backbones: ResNet-18/50 (3x3 stride-1 stem, no max-pool) and WRN-34-10.

Each backbone maps [B, 3, H, W] (already normalised) to pooled features [B, feature_dim] and
exposes `forward_layers` (the output of every stage) for representation analysis.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, block: type[nn.Module], num_blocks: list[int], width: int = 64,
                 stem_padding: int = 1) -> None:
        super().__init__()
        self.in_planes = width
        # DeACL/solo-learn use padding=2 in the 3x3 stem, ACL/RoCL padding=1 (SPEC §2).
        self.conv1 = nn.Conv2d(3, width, 3, 1, stem_padding, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, width * 2, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, width * 4, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, width * 8, num_blocks[3], 2)
        self.feature_dim = width * 8 * block.expansion

    def _make_layer(self, block: type[nn.Module], planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            outs.append(layer(outs[-1]))
        outs.append(torch.flatten(F.adaptive_avg_pool2d(outs[-1], 1), 1))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class WideBasic(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis), as used by TRADES' WRN-34-10."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (self.shortcut(o) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen: int = 10, stem_padding: int = 1) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, stem_padding, bias=False)
        self.in_planes = widths[0]
        self.layer1 = self._make(widths[1], n, 1)
        self.layer2 = self._make(widths[2], n, 2)
        self.layer3 = self._make(widths[3], n, 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]

    def _make(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(WideBasic(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward_layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [self.conv1(x)]
        for layer in (self.layer1, self.layer2, self.layer3):
            outs.append(layer(outs[-1]))
        out = F.relu(self.bn(outs[-1]))
        outs.append(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def build_backbone(arch: str, width: int = 64, stem_padding: int = 1) -> nn.Module:
    if arch == "resnet18":
        return CifarResNet(BasicBlock, [2, 2, 2, 2], width, stem_padding)
    if arch == "resnet50":
        return CifarResNet(Bottleneck, [3, 4, 6, 3], width, stem_padding)
    if arch == "wrn34_10":
        return WideResNet(34, 10, stem_padding)
    raise ValueError(f"model.arch={arch!r} is not known; allowed: resnet18, resnet50, wrn34_10")


ARCHS = ("resnet18", "resnet50", "wrn34_10")
