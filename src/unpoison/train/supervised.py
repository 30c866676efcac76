"""Supervised training and inference on in-memory uint8 datasets, built on the Engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..runtime import Runtime
from .engine import Engine, OptimConfig

AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "none": lambda x, g: x,
    "weak": augment.weak,
    # crop + flip + a 2x2 cutout hole: the ABL/CBD training transform (Cutout "length 3")
    "weak+cutout": lambda x, g: augment.cutout(augment.weak(x, g), g, 2, fill=0.0),
    # flip + a shift of up to 2 pixels with mirrored borders: gentler than "weak", which suits
    # a run of ten-odd epochs (airbench's augmentation)
    "light": lambda x, g: augment.weak(x, g, padding=2, pad_mode="reflect"),
    "strong": augment.strong,
}


@dataclass
class TrainConfig:
    """A plain supervised recipe: epochs, batch, optimiser, augmentation, regularisers."""

    epochs: int = 10
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: str = "weak"
    label_smoothing: float = 0.0
    ema_decay: float | None = None


class DeviceData:
    """A dataset's images and labels placed once on the training device."""

    def __init__(self, data: ImageSet, runtime: Runtime) -> None:
        self.images = data.images.to(runtime.device)
        self.labels = data.labels.to(runtime.device)
        self.runtime = runtime

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: torch.Tensor, augmentation: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = index.to(self.images.device)
        x = augment.to_float(self.images[index])
        x = AUGMENTATIONS[augmentation](x, g)
        return self.runtime.to_device(x), self.labels[index]


def supervised_epoch(data: DeviceData, batch_size: int, augmentation: str = "weak", label_smoothing: float = 0.0,
                     sample_weights: torch.Tensor | None = None, drop_last: bool = False):
    """An epoch_fn: one shuffled pass of (optionally per-sample weighted) cross-entropy."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = data.batch(index, augmentation, g)
            logits = engine.model(x)
            if sample_weights is None:
                return F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            per_sample = F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
            return (per_sample * sample_weights[index.to(per_sample.device)]).mean()

        engine.run_pass(batch_indices(len(data), batch_size, g, drop_last=drop_last), loss_fn)

    return epoch_fn


def train_supervised(model: nn.Module, data: ImageSet, cfg: TrainConfig, runtime: Runtime, *, name: str,
                     seed: int, checkpoint_dir=None, log_path=None, on_epoch_end=None,
                     progress: bool = True) -> nn.Module:
    """Train with plain cross-entropy; returns the final (EMA, when enabled) model in eval mode."""
    steps = -(-len(data) // cfg.batch_size)
    engine = Engine(model, cfg.optim, runtime, name=name, epochs=cfg.epochs, steps_per_epoch=steps, seed=seed,
                    checkpoint_dir=checkpoint_dir, ema_decay=cfg.ema_decay, log_path=log_path,
                    on_epoch_end=on_epoch_end, progress=progress)
    device_data = DeviceData(data, runtime)
    return engine.fit(supervised_epoch(device_data, cfg.batch_size, cfg.augment, cfg.label_smoothing)).eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, runtime: Runtime, batch_size: int = 1024,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None, tta: bool = False) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images, in eval mode; with `tta`, averaged over
    test-time views (`tta_logits`)."""
    return _map_batches(model, images, runtime, batch_size, transform, tta_logits if tta else lambda m, x: m(x))


def tta_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Test-time augmentation: the image and its mirror (weight 1/2 together), and the image
    shifted one pixel up-left and one down-right with mirrored borders, each with its mirror
    (1/4 a pair): the views the training augmentations make most often."""
    def pair(v: torch.Tensor) -> torch.Tensor:
        return (model(v) + model(v.flip(3))) / 2

    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = (pair(padded[..., :h, :w]) + pair(padded[..., 2:, 2:])) / 2
    return (pair(x) + shifted) / 2


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, runtime: Runtime, batch_size: int = 1024,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Penultimate features `model.features(x)` (float32, CPU) for uint8 images, in eval mode."""
    return _map_batches(model, images, runtime, batch_size, transform, lambda m, x: m.features(x))


def _map_batches(model, images, runtime, batch_size, transform, fn) -> torch.Tensor:
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        x = augment.to_float(images[start:start + batch_size].to(runtime.device))
        if transform is not None:
            x = transform(x)
        with runtime.autocast():
            outputs.append(fn(model, runtime.to_device(x)).float().cpu())
    model.train(was_training)
    if not outputs:
        return torch.empty(0)
    return torch.cat(outputs)
