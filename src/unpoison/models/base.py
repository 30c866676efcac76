"""The shape every model in unpoison has: `features(x)` then `head`.

Inputs are float images in [0, 1]; each model normalises internally with the mean/std
it was built with, so callers (and `model.pt` users) never need to know the statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import split_batch

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Classifier(nn.Module):
    feature_dim: int

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.head: nn.Linear

    def backbone(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate representation (pooled, flattened), what the head sees. Under
        torchrun each rank computes the backbone on its slice of the batch, and every rank
        gets all of it back (`distributed.split_batch`)."""
        return split_batch(self.backbone, (x - self.mean) / self.std, self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
