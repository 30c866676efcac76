"""FixMatch (Sohn et al., NeurIPS 2020) as a building block: labelled + unlabelled streams.

One step (spec §5.6):
  labelled batch (x, y) of size B and unlabelled batch u of size mu*B;
  one forward over [weak(x); weak(u); strong(u)] (so BatchNorm sees one batch, as the
  reference implementations do on a single device);
  l_s = CE(y, f(weak(x)));
  q = softmax(f(weak(u))) without gradient, pseudo-label argmax q, mask max q >= tau;
  l_u = mean over the whole unlabelled batch of mask * CE(pseudo, f(strong(u)));
  loss = l_s + lambda_u * l_u.
Weights are averaged (EMA 0.999, through the Engine) and the EMA copy is what is returned.

The unlabelled stream is a bare uint8 image tensor: this module never receives labels
for it, so no caller can leak them by mistake (DLP relies on that: the labels of the
unlabelled set are exactly what a poisoner controls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..data.batches import endless_indices
from ..data.imageset import ImageSet
from ..runtime import Runtime
from .engine import Engine, OptimConfig


def _fixmatch_optim() -> OptimConfig:
    # FixMatch: SGD Nesterov 0.9, lr 0.03, wd 5e-4 without decay on BN/bias (the PyTorch
    # port), lr * cos(7 pi k / 16 K) over the K steps of the run.
    return OptimConfig(lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="fixmatch_cosine",
                       decay_norm_and_bias=False)


@dataclass
class FixMatchConfig:
    """FixMatch's defaults; `epochs` x `steps_per_epoch` = K, the run's total steps.

    steps_per_epoch None means one pass over the unlabelled set (ceil(N_u / (mu B)) steps);
    the original "epoch" of the PyTorch port is 1024 steps.
    """

    epochs: int = 64
    steps_per_epoch: int | None = 1024
    batch_size: int = 64          # B, labelled images per step
    mu: int = 7                   # unlabelled images per step = mu * B
    threshold: float = 0.95       # tau: confidence above which a pseudo-label is used
    lambda_u: float = 1.0
    ema_decay: float | None = 0.999
    optim: OptimConfig = field(default_factory=_fixmatch_optim)

    def steps(self, n_unlabelled: int) -> int:
        if self.steps_per_epoch:
            return self.steps_per_epoch
        return max(1, math.ceil(n_unlabelled / (self.mu * self.batch_size)))


def weak_view(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """FixMatch's weak augmentation: flip + translate up to 12.5 % (reflect-pad 4, crop)."""
    return augment.weak(x, g, padding=4, pad_mode="reflect")


def fixmatch_loss(model: nn.Module, x_labelled: torch.Tensor, y_labelled: torch.Tensor, u_weak: torch.Tensor,
                  u_strong: torch.Tensor, threshold: float, lambda_u: float) -> tuple[torch.Tensor, dict]:
    """The FixMatch objective on already-augmented batches; returns (loss, statistics)."""
    logits = model(torch.cat([x_labelled, u_weak, u_strong]))
    n_l, n_u = len(x_labelled), len(u_weak)
    logits_l, logits_weak, logits_strong = logits[:n_l], logits[n_l:n_l + n_u], logits[n_l + n_u:]
    loss_s = F.cross_entropy(logits_l, y_labelled)
    with torch.no_grad():
        confidence, pseudo = torch.softmax(logits_weak.detach().float(), 1).max(1)
        mask = (confidence >= threshold).float()
    # averaged over the whole unlabelled batch, masked-out samples included (the paper's l_u)
    loss_u = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
    stats = {"loss_x": float(loss_s.detach()), "loss_u": float(loss_u.detach()), "mask_rate": float(mask.mean())}
    return loss_s + lambda_u * loss_u, stats


def fixmatch_epoch(labelled_images: torch.Tensor, labels: torch.Tensor, unlabelled_images: torch.Tensor,
                   cfg: FixMatchConfig, runtime: Runtime):
    """An epoch_fn for the Engine: `cfg.steps(N_u)` FixMatch steps.

    `unlabelled_images` is a uint8 tensor with no labels attached, by design.
    """
    labelled_images = labelled_images.to(runtime.device)
    labels = labels.to(runtime.device)
    unlabelled_images = unlabelled_images.to(runtime.device)
    steps = cfg.steps(len(unlabelled_images))

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        labelled_stream = endless_indices(len(labels), cfg.batch_size, g)
        unlabelled_stream = endless_indices(len(unlabelled_images), cfg.mu * cfg.batch_size, g)
        # index streams are drawn up front so the augmentation draws below are reproducible
        batches = [(next(labelled_stream), next(unlabelled_stream)) for _ in range(steps)]
        totals = {"loss_x": 0.0, "loss_u": 0.0, "mask_rate": 0.0}

        def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            li, ui = (i.to(runtime.device) for i in batch)
            x = weak_view(augment.to_float(labelled_images[li]), g)
            u = augment.to_float(unlabelled_images[ui])
            u_weak, u_strong = weak_view(u, g), augment.strong(u, g)
            loss, stats = fixmatch_loss(engine.model, runtime.to_device(x), labels[li], runtime.to_device(u_weak),
                                        runtime.to_device(u_strong), cfg.threshold, cfg.lambda_u)
            for key, value in stats.items():
                totals[key] += value
            return loss

        engine.run_pass(batches, loss_fn)
        return {key: round(value / steps, 4) for key, value in totals.items()}

    return epoch_fn


def train_fixmatch(model: nn.Module, labelled: ImageSet, unlabelled_images: torch.Tensor, cfg: FixMatchConfig,
                   runtime: Runtime, *, name: str, seed: int, checkpoint_dir=None, log_path=None,
                   on_epoch_end=None, progress: bool = True) -> nn.Module:
    """Semi-supervised training from `model`'s current weights; returns the EMA model (eval mode).

    `labelled` carries images and labels; `unlabelled_images` is images only.
    """
    if isinstance(unlabelled_images, ImageSet):
        raise TypeError("train_fixmatch takes the unlabelled *images* only (a uint8 tensor), never their labels")
    if len(labelled) == 0:
        raise ValueError("FixMatch needs at least one labelled image")
    model.requires_grad_(True)   # the starting point may be an EMA copy, which has gradients off
    engine = Engine(model, cfg.optim, runtime, name=name, epochs=cfg.epochs,
                    steps_per_epoch=cfg.steps(len(unlabelled_images)), seed=seed, checkpoint_dir=checkpoint_dir,
                    ema_decay=cfg.ema_decay, log_path=log_path, on_epoch_end=on_epoch_end, progress=progress)
    epoch_fn = fixmatch_epoch(labelled.images, labelled.labels, unlabelled_images, cfg, runtime)
    return engine.fit(epoch_fn).eval()
