"""Unlearning by gradient ascent on a suspected-poisoned set (ABL's stage 2, DLP's AU).

Minimising -CE on the suspected set breaks the trigger -> target mapping those samples
taught the model. Ascent on cross-entropy is unbounded, though: continued long enough it
stops "forgetting the trigger" and starts "never predict the target class, and then
predict garbage" (on our CPU, DLP's AU as written - lr 0.01, momentum 0.9, 20 epochs -
takes CIFAR-10 accuracy to 10 %). Two ways to bound it, both looking at the suspected
set only (never at test data):
  early_stop  before each epoch, measure the model's accuracy on the suspected set
              against its given labels; once it is at or below chance (1/C) the set is
              unlearned and the stage ends (the Engine stops at an epoch marked `stopped`);
  loss_bound  each sample's loss is clipped at the bound, so a sample that is already
              misclassified with loss above the bound contributes no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..runtime import Runtime
from .engine import Engine, OptimConfig
from .supervised import DeviceData, predict


@dataclass
class UnlearnConfig:
    epochs: int = 20
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
    augment: str = "none"
    # None: plain ascent on the mean CE (as the papers write it). A number: per-sample CE
    # clipped at this value, so ascent ends once every suspected sample is past it.
    loss_bound: float | None = None
    # stop once the suspected set is predicted no better than chance (see module doc)
    early_stop: bool = False
    # keep BatchNorm statistics frozen, so a few hundred triggered images do not
    # overwrite the running mean/variance the whole training set produced
    freeze_bn: bool = False


def set_batchnorm_mode(model: nn.Module, train: bool) -> None:
    """Switch only the BatchNorm layers: eval = normalise with the running statistics (and
    leave them untouched), train = normalise with the batch's own and update them."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(train)


@torch.no_grad()
def suspected_accuracy(model: nn.Module, data: DeviceData) -> float:
    """Accuracy against the given labels, eval mode, un-augmented images."""
    return float((predict(model, data.images, data.runtime).argmax(1) == data.labels.cpu()).float().mean())


def ascent_epoch(data: DeviceData, cfg: UnlearnConfig, num_classes: int):
    """An epoch_fn: one shuffled pass of gradient ascent on cross-entropy."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        extra: dict = {}
        if cfg.early_stop:
            fitted = suspected_accuracy(engine.model, data)
            extra["suspected_acc"] = round(fitted, 4)
            if fitted <= 1.0 / num_classes:
                return {**extra, "stopped": True}
            engine.model.train()
        if cfg.freeze_bn:
            set_batchnorm_mode(engine.model, train=False)
        active = []

        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = data.batch(index, cfg.augment, g)
            per_sample = F.cross_entropy(engine.model(x), y, reduction="none")
            if cfg.loss_bound is None:
                return -per_sample.mean()
            active.append(float((per_sample < cfg.loss_bound).float().mean()))
            return -per_sample.clamp(max=cfg.loss_bound).mean()

        engine.run_pass(batch_indices(len(data), cfg.batch_size, g), loss_fn)
        if active:
            extra["still_ascending"] = round(sum(active) / len(active), 4)
        return extra

    return epoch_fn


def unlearn(model: nn.Module, suspected: ImageSet, cfg: UnlearnConfig, runtime: Runtime, *, name: str, seed: int,
            checkpoint_dir=None, log_path=None, on_epoch_end=None, progress: bool = True) -> nn.Module:
    """Gradient ascent on `suspected` starting from `model`'s weights; returns the model (eval mode)."""
    steps = -(-len(suspected) // cfg.batch_size)
    model.requires_grad_(True)   # an EMA copy (e.g. FixMatch's output) comes with gradients off
    engine = Engine(model, cfg.optim, runtime, name=name, epochs=cfg.epochs, steps_per_epoch=steps, seed=seed,
                    checkpoint_dir=checkpoint_dir, log_path=log_path, on_epoch_end=on_epoch_end, progress=progress)
    return engine.fit(ascent_epoch(DeviceData(suspected, runtime), cfg, suspected.num_classes)).eval()
