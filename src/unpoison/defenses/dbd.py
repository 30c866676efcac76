"""DBD: backdoor defence via decoupling the training process (Huang et al., ICLR 2022).

Poisoned images cluster by their trigger only when the backbone learns from their labels.
DBD therefore never lets the untrusted labels shape the backbone until the poison is set
aside:
    1. Self-supervised pre-training: SimCLR on every training image, labels unused.
    2. Warm-up: the backbone frozen, a linear head trained on all samples with the
       symmetric cross-entropy (SCE = alpha * CE + beta * RCE, alpha 0.1, beta 1). A
       poisoned sample's label disagrees with what its self-supervised features say, so it
       keeps a high loss.
    3. Split: the epsilon = 50 % samples with the lowest SCE loss keep their labels; the
       rest become unlabelled.
    4. Semi-supervised fine-tuning of the whole network on the labelled and unlabelled sets.

Substitutions, stated: the project's SimCLR (train/contrastive.py, the SupCon loss with
each image's own second view as its only positive, temperature 0.5) and FixMatch
(train/fixmatch.py) where the paper uses SimCLR's official code and MixMatch. The warm-up
head is trained on features computed once without augmentation (the frozen backbone in
eval mode gives the same features every epoch; the official code re-augments). The last
epoch is returned (no test-set selection).

Budgets: paper = SimCLR 1000 epochs at batch 512, warm-up 10 epochs, FixMatch 190 x 1024
steps (MixMatch's in the paper). quick: SimCLR 6 epochs at batch 256 (like D-ST's quick
SS-CTL), warm-up 10 epochs on cached features, FixMatch 5 passes over the unlabelled half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..train.contrastive import ContrastiveNet, contrastive_loss, contrastive_optim, ss_ctl_positives
from ..train.engine import Engine, OptimConfig
from ..train.fixmatch import FixMatchConfig, train_fixmatch
from ..train.supervised import DeviceData, extract_features, predict
from .base import Defense, DefenseContext, DefenseResult, StageTimer


def semi_recipe(profile: str) -> FixMatchConfig:
    if profile == "paper":
        return FixMatchConfig(epochs=190, steps_per_epoch=1024, batch_size=64, mu=7)
    if profile == "quick":
        return FixMatchConfig(epochs=5, steps_per_epoch=None, batch_size=64, mu=3, ema_decay=0.99)
    return FixMatchConfig(epochs=2, steps_per_epoch=4, batch_size=16, mu=2, ema_decay=0.9)


@dataclass
class DBDConfig:
    # 1. SimCLR
    ssl_epochs: int = 1000
    ssl_batch_size: int = 512
    ssl_optim: OptimConfig = field(default_factory=lambda: contrastive_optim(0.4))
    temperature: float = 0.5
    projection_dim: int = 128
    # 2. warm-up of the linear head with the symmetric cross-entropy
    warmup_epochs: int = 10
    warmup_batch_size: int = 128
    warmup_lr: float = 0.002          # Adam, as the official code
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    # 3. split
    epsilon: float = 0.5              # share of the samples, lowest SCE loss first, that keep their labels
    # 4. semi-supervised fine-tuning
    semi: FixMatchConfig = field(default_factory=lambda: semi_recipe("paper"))

    @classmethod
    def for_profile(cls, profile: str) -> "DBDConfig":
        if profile == "paper":
            return cls()
        if profile == "quick":
            return cls(ssl_epochs=6, ssl_batch_size=256,
                       ssl_optim=contrastive_optim(0.2, warmup_epochs=1, warmup_start=0.02), semi=semi_recipe("quick"))
        if profile == "smoke":
            return cls(ssl_epochs=2, ssl_batch_size=64, ssl_optim=contrastive_optim(0.1), warmup_epochs=10,
                       warmup_batch_size=32, warmup_lr=0.01, semi=semi_recipe("smoke"))
        raise ValueError(f"unknown profile {profile!r}")


def symmetric_ce(logits: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                 reduction: str = "mean") -> torch.Tensor:
    """SCE (Wang et al. 2019): alpha * CE + beta * RCE, RCE = -sum_k p_k log q_k with the
    one-hot label q clipped at 1e-4, i.e. -log(1e-4) * (1 - p_y)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_label = torch.softmax(logits, 1).gather(1, labels[:, None]).squeeze(1)
    rce = -math.log(1e-4) * (1 - p_label)
    loss = alpha * ce + beta * rce
    return loss.mean() if reduction == "mean" else loss


def simclr_epoch(images: DeviceData, cfg: DBDConfig):
    """An epoch_fn: one SimCLR pass (two views per image; each view's only positive is the other)."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, _ = images.batch(index, "none", g)   # the labels are not read
            views = torch.cat([augment.contrastive_view(x, g), augment.contrastive_view(x, g)])
            z1, z2 = engine.model(images.runtime.to_device(views)).float().chunk(2)
            nobody = torch.zeros(len(index), dtype=torch.bool, device=z1.device)
            positives = ss_ctl_positives(torch.zeros(len(index), dtype=torch.long, device=z1.device), nobody)
            return contrastive_loss(torch.cat([z1, z2]), positives, cfg.temperature, cfg.temperature)

        engine.run_pass(batch_indices(len(images), cfg.ssl_batch_size, g, drop_last=True), loss_fn)

    return epoch_fn


def pretrain(data: ImageSet, ctx: DefenseContext, cfg: DBDConfig) -> nn.Module:
    """Stage 1: SimCLR from scratch on the images alone; returns the encoder (a Classifier)."""
    images_only = ImageSet(data.images, torch.zeros(len(data), dtype=torch.long), list(data.classes))
    net = ContrastiveNet(ctx.new_model(data, role="dbd-simclr"), cfg.projection_dim)
    engine = Engine(net, cfg.ssl_optim, ctx.runtime, name="dbd-simclr", epochs=cfg.ssl_epochs,
                    steps_per_epoch=max(1, len(data) // cfg.ssl_batch_size), seed=ctx.seed,
                    checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path, progress=ctx.progress)
    return engine.fit(simclr_epoch(DeviceData(images_only, ctx.runtime), cfg)).encoder.eval()


def warm_up(encoder: nn.Module, data: ImageSet, ctx: DefenseContext, cfg: DBDConfig) -> nn.Module:
    """Stage 2: a linear head on the frozen encoder's features, trained with SCE on every sample."""
    features = extract_features(encoder, data.images, ctx.runtime).to(ctx.runtime.device)
    labels = data.labels.to(ctx.runtime.device)
    torch.manual_seed(ctx.seed)
    head = nn.Linear(encoder.feature_dim, data.num_classes)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            index = index.to(labels.device)
            return symmetric_ce(engine.model(features[index]), labels[index], cfg.sce_alpha, cfg.sce_beta)

        engine.run_pass(batch_indices(len(data), cfg.warmup_batch_size, g), loss_fn)

    optim = OptimConfig(lr=cfg.warmup_lr, optimizer="adam", weight_decay=0.0, schedule="constant")
    engine = Engine(head, optim, ctx.runtime, name="dbd-warmup", epochs=cfg.warmup_epochs,
                    steps_per_epoch=-(-len(data) // cfg.warmup_batch_size), seed=ctx.seed,
                    checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path, progress=ctx.progress)
    encoder.head = engine.fit(epoch_fn)
    return encoder.eval()


@torch.no_grad()
def sce_losses(model: nn.Module, data: ImageSet, ctx: DefenseContext, cfg: DBDConfig) -> torch.Tensor:
    logits = predict(model, data.images, ctx.runtime)
    return symmetric_ce(logits, data.labels, cfg.sce_alpha, cfg.sce_beta, reduction="none")


class DBD(Defense):
    name = "dbd"
    Config = DBDConfig
    main_epochs = "semi.epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg, timer = self.config, StageTimer(ctx)
        if not 0 < cfg.epsilon < 1:
            raise ValueError(f"DBD epsilon must lie in (0, 1), got {cfg.epsilon}")
        encoder = timer.run("simclr", cfg.ssl_epochs, lambda: pretrain(data, ctx, cfg), model_of=lambda m: None)
        model = timer.run("warmup", cfg.warmup_epochs, lambda: warm_up(encoder, data, ctx, cfg))
        losses = sce_losses(model, data, ctx, cfg)
        labelled = torch.zeros(len(data), dtype=torch.bool)
        labelled[losses.argsort()[: int(round(cfg.epsilon * len(data)))]] = True
        model = timer.run("semi", cfg.semi.epochs, lambda: train_fixmatch(
            model.requires_grad_(True), data.subset(labelled), data.images[~labelled], cfg.semi, ctx.runtime,
            name="dbd-fixmatch", seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
            on_epoch_end=ctx.epoch_hook("semi"), progress=ctx.progress))
        return DefenseResult(model, suspicion=losses, flagged=~labelled, trusted=labelled, stages=timer.records,
                             notes=[f"{int(labelled.sum())} lowest-SCE samples kept their labels "
                                    f"(epsilon {cfg.epsilon}); the rest trained unlabelled (FixMatch for MixMatch)"])
