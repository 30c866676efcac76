"""VGG-16 with batch norm for 32x32 inputs: 13 conv layers, 5 max-pools -> 512-d."""

from __future__ import annotations

import torch
from torch import nn

from .base import Classifier

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16BN(Classifier):
    def __init__(self, num_classes: int = 10, **norm) -> None:
        super().__init__(**norm)
        layers, channels = [], 3
        for v in VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                channels = v
        self.body = nn.Sequential(*layers)
        self.feature_dim = 512
        self.head = nn.Linear(512, num_classes)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(self.body(x), 1).flatten(1)
