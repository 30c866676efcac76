"""Training: the shared engine, supervised recipes, and semi-supervised building blocks."""

from .engine import EMA, Engine, OptimConfig, atomic_torch_save, lr_at
from .supervised import AUGMENTATIONS, DeviceData, TrainConfig, extract_features, predict, supervised_epoch, train_supervised

__all__ = ["EMA", "Engine", "OptimConfig", "TrainConfig", "DeviceData", "AUGMENTATIONS", "atomic_torch_save",
           "extract_features", "lr_at", "predict", "supervised_epoch", "train_supervised"]
