"""ResNet-18 for 32x32 inputs (CIFAR stem, with or without the stem max-pool) and
PreAct-ResNet-18 (He et al. 2016, the BackdoorBench default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Classifier
from .wrn import PreActBlock


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _stages(block, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)) -> nn.Sequential:
    layers, in_planes = [], 64
    for width, count, stride in zip(widths, blocks, (1, 2, 2, 2)):
        for i in range(count):
            layers.append(block(in_planes, width, stride if i == 0 else 1))
            in_planes = width
    return nn.Sequential(*layers)


class ResNet18(Classifier):
    """3x3 stem (stride 1); `stem_maxpool=True` is the FCT/D-BR variant (spec §1.1)."""

    def __init__(self, num_classes: int = 10, stem_maxpool: bool = False, **norm) -> None:
        super().__init__(**norm)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1) if stem_maxpool else nn.Identity()
        self.layers = _stages(BasicBlock)
        self.feature_dim = 512
        self.head = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.pool(F.relu(self.bn1(self.conv1(x)))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class PreActResNet18(Classifier):
    def __init__(self, num_classes: int = 10, **norm) -> None:
        super().__init__(**norm)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.layers = _stages(PreActBlock)
        self.bn = nn.BatchNorm2d(512)
        self.feature_dim = 512
        self.head = nn.Linear(512, num_classes)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
