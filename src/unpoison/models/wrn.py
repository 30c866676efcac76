"""Wide ResNet (Zagoruyko & Komodakis) exactly as ABL and CBD use it (spec §1.1).

WRN-16-1: 3x3 stem to 16 channels, three groups of two pre-activation blocks
(16, 32, 64 channels; strides 1, 2, 2), BN-ReLU, 8x8 average pool -> 64-d, Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Classifier


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        # where the width or stride changes, the 1x1 shortcut takes the *pre-activated* input
        self.shortcut = None if (in_planes == out_planes and stride == 1) else \
            nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(Classifier):
    def __init__(self, depth: int = 16, widen: int = 1, num_classes: int = 10, **norm) -> None:
        super().__init__(**norm)
        if (depth - 4) % 6:
            raise ValueError("WRN depth must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [PreActBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1)
                      for i in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.head = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        # the 8x8 average pool of a 32x32 input, written adaptively so other sizes work
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
