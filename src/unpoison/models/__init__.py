"""Models for 32x32 inputs, built by name. Each exposes `features(x)` and `head`."""

from __future__ import annotations

import re
from typing import Callable

from .base import CIFAR10_MEAN, CIFAR10_STD, Classifier
from .mobilenet import MobileNetV2
from .quicknet import QuickNet
from .resnet import PreActResNet18, ResNet18
from .vgg import VGG16BN
from .wrn import WideResNet

MODELS: dict[str, Callable[..., Classifier]] = {
    "wrn16-1": lambda **kw: WideResNet(16, 1, **kw),
    "wrn16-2": lambda **kw: WideResNet(16, 2, **kw),
    "wrn40-1": lambda **kw: WideResNet(40, 1, **kw),
    "preact-resnet18": PreActResNet18,
    "resnet18": ResNet18,
    "resnet18-maxpool": lambda **kw: ResNet18(stem_maxpool=True, **kw),
    "vgg16-bn": VGG16BN,
    "mobilenetv2": MobileNetV2,
    "quicknet": QuickNet,
    "quicknet-s": lambda **kw: QuickNet((32, 128, 128), **kw),
    "quicknet-m": lambda **kw: QuickNet((48, 192, 192), **kw),
}


def build_model(name: str, num_classes: int, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> Classifier:
    """Build a registered model; `wrn{depth}-{width}` works for any valid WRN too."""
    key = name.lower()
    if key in MODELS:
        return MODELS[key](num_classes=num_classes, mean=tuple(mean), std=tuple(std))
    match = re.fullmatch(r"wrn(\d+)-(\d+)", key)
    if match:
        return WideResNet(int(match[1]), int(match[2]), num_classes=num_classes, mean=tuple(mean), std=tuple(std))
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


__all__ = ["MODELS", "Classifier", "build_model", "CIFAR10_MEAN", "CIFAR10_STD"]
