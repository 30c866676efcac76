"""MobileNetV2 adapted to 32x32 inputs (stride-1 stem and second stage, as is usual for CIFAR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Classifier

# (expansion, out channels, blocks, first stride)
CIFAR_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_planes * expansion
        self.use_residual = stride == 1 and in_planes == out_planes
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_planes, 1, bias=False), nn.BatchNorm2d(out_planes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.use_residual else out


class MobileNetV2(Classifier):
    def __init__(self, num_classes: int = 10, **norm) -> None:
        super().__init__(**norm)
        layers = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(inplace=True)]
        channels = 32
        for expansion, out, blocks, stride in CIFAR_SETTINGS:
            for i in range(blocks):
                layers.append(InvertedResidual(channels, out, expansion, stride if i == 0 else 1))
                channels = out
        layers += [nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.feature_dim = 1280
        self.head = nn.Linear(1280, num_classes)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)
