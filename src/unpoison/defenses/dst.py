"""D-ST: train a secure model from scratch (Chen, Wu & Wang, NeurIPS 2022; spec §3.6-3.7).

    1. SD module (detect/fct.py): FCT scores split the untrusted set into trusted clean D_c
       (lowest 20 %), suspected poisoned D_p (highest 5 %) and uncertain D_u.
    2. SS-CTL: learn the feature extractor with a semi-supervised contrastive loss on all
       samples, two views each. A trusted-clean anchor's positives are all views with its
       label (SupCon); any other anchor's only positive is its own second view (SimCLR), so
       the labels of suspicious samples - and with them the trigger -> target link - are
       never used to pull samples together.
    3. Freeze the extractor and train a linear classifier on D_c and D_p with the mixed
       cross-entropy CE(D_c) - lambda * CE(D_p), lambda = 0.001: learn clean, unlearn poisoned.
    4. The last epoch is the result (the official script keeps the best *test* accuracy).

The network is the paper's SupCon ResNet-18 without stem max-pool in `paper` (`model`), the
run's `--model` otherwise; the returned model is that network with the new linear head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..detect.fct import SampleSplit, SDConfig, sample_distinguishment
from ..runtime import derive_seed
from ..train.contrastive import ContrastiveNet, contrastive_optim, ss_ctl_loss
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData
from .base import Defense, DefenseContext, DefenseResult, StageTimer


@dataclass
class DSTConfig:
    """D-ST. paper = the official code (SS-CTL 200 epochs at batch 512; classifier 10 epochs).

    quick: see for_profile; smoke: a couple of epochs."""

    sd: SDConfig = field(default_factory=SDConfig)
    # the network (its encoder is trained by SS-CTL): None = the run's --model; paper: the
    # SupCon ResNet-18 (3x3 stem, no max-pool)
    model: str | None = None
    # --- stage 1: SS-CTL
    ctl_epochs: int = 200
    ctl_batch_size: int = 512
    # lr 0.5, cosine to lr * 0.1^3 = 5e-4, 10 warm-up epochs from 0.01 (= 0.02 * lr), wd 1e-4
    ctl_optim: OptimConfig = field(default_factory=lambda: contrastive_optim(
        0.5, min_lr_fraction=1e-3, warmup_epochs=10, warmup_start=0.02))
    temperature: float = 0.1
    base_temperature: float = 0.07
    projection_dim: int = 128
    strict_positives: bool = False   # True: clean anchors take only trusted-clean label positives
    # --- stage 2: linear classifier with the mixed cross-entropy
    cls_epochs: int = 10
    cls_batch_size: int = 512
    cls_optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=5.0, momentum=0.9, nesterov=False, weight_decay=0.0, schedule="constant"))
    unlearn_weight: float = 0.001    # lambda

    @classmethod
    def for_profile(cls, profile: str) -> "DSTConfig":
        sd = SDConfig.for_profile(profile)
        if profile == "paper":
            return cls(sd=sd, model="resnet18")
        if profile == "quick":
            # 6 SS-CTL epochs instead of 200 (each is two views of 50k images: ~2x a supervised
            # epoch), at batch 256 for twice the steps, lr scaled linearly with the batch and
            # one warm-up epoch; the classifier stage is the paper's
            return cls(sd=sd, ctl_epochs=6, ctl_batch_size=256, ctl_optim=contrastive_optim(
                0.25, min_lr_fraction=1e-3, warmup_epochs=1, warmup_start=0.02))
        if profile == "smoke":
            return cls(sd=sd, ctl_epochs=3, ctl_batch_size=64, cls_epochs=3, cls_batch_size=64,
                       ctl_optim=contrastive_optim(0.1, min_lr_fraction=1e-3),
                       cls_optim=OptimConfig(lr=1.0, momentum=0.9, nesterov=False, weight_decay=0.0,
                                             schedule="constant"))
        raise ValueError(f"unknown profile {profile!r}")


def ss_ctl_epoch(data: DeviceData, trusted: torch.Tensor, cfg: DSTConfig):
    """An epoch_fn: one pass of the SS-CTL loss, both views of a batch in one forward."""
    trusted = trusted.to(data.labels.device)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = data.batch(index, "none", g)
            views = torch.cat([augment.contrastive_view(x, g), augment.contrastive_view(x, g)])
            z1, z2 = engine.model(data.runtime.to_device(views)).float().chunk(2)
            return ss_ctl_loss(z1, z2, y, trusted[index.to(trusted.device)], cfg.temperature,
                               cfg.base_temperature, cfg.strict_positives)

        engine.run_pass(batch_indices(len(data), cfg.ctl_batch_size, g, drop_last=True), loss_fn)

    return epoch_fn


def train_extractor(data: ImageSet, split: SampleSplit, ctx: DefenseContext, cfg: DSTConfig,
                    name: str = "ss_ctl") -> nn.Module:
    """Stage 1: a fresh network trained with SS-CTL; returns the encoder (a Classifier)."""
    net = ContrastiveNet(ctx.new_model(data, cfg.model, role=name), cfg.projection_dim)
    steps = max(1, len(data) // cfg.ctl_batch_size)
    engine = Engine(net, cfg.ctl_optim, ctx.runtime, name=name, epochs=cfg.ctl_epochs, steps_per_epoch=steps,
                    seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path, progress=ctx.progress)
    return engine.fit(ss_ctl_epoch(DeviceData(data, ctx.runtime), split.clean, cfg)).encoder.eval()


def mixed_ce_epoch(data: DeviceData, is_suspect: torch.Tensor, cfg: DSTConfig):
    """An epoch_fn: CE on trusted-clean samples minus lambda * CE on suspected-poisoned ones,
    through a frozen extractor (eval mode: its BN statistics stay fixed)."""
    is_suspect = is_suspect.to(data.labels.device)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
        engine.model.eval()
        model = engine.model

        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = data.batch(index, "none", g)
            x = data.runtime.to_device(augment.contrastive_view(x, g))
            with torch.no_grad():
                features = model.features(x)
            per_sample = F.cross_entropy(model.head(features.float()), y, reduction="none")
            suspect = is_suspect[index.to(is_suspect.device)]
            learn = per_sample[~suspect].mean() if (~suspect).any() else per_sample.sum() * 0
            unlearn = per_sample[suspect].mean() if suspect.any() else per_sample.sum() * 0
            return learn - cfg.unlearn_weight * unlearn

        engine.run_pass(batch_indices(len(data), cfg.cls_batch_size, g), loss_fn)

    return epoch_fn


def train_classifier(encoder: nn.Module, data: ImageSet, split: SampleSplit, ctx: DefenseContext,
                     cfg: DSTConfig, name: str = "mixed_ce") -> nn.Module:
    """Stage 2: a new linear head on the frozen encoder, trained on D_c and D_p (D_u dropped)."""
    keep = split.clean | split.poisoned
    encoder.requires_grad_(False)
    torch.manual_seed(derive_seed(ctx.seed, "init", name))   # a resumed run draws the same head
    encoder.head = nn.Linear(encoder.feature_dim, data.num_classes)
    encoder.head.to(next(encoder.parameters()).device)
    subset = DeviceData(data.subset(keep), ctx.runtime)
    engine = Engine(encoder, cfg.cls_optim, ctx.runtime, name=name, epochs=cfg.cls_epochs,
                    steps_per_epoch=-(-len(subset) // cfg.cls_batch_size), seed=ctx.seed,
                    params=encoder.head.parameters(), checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                    on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)
    model = engine.fit(mixed_ce_epoch(subset, split.poisoned[keep], cfg))
    return model.requires_grad_(True).eval()


class DST(Defense):
    name = "dst"
    Config = DSTConfig
    main_epochs = "ctl_epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg, timer = self.config, StageTimer(ctx)
        split = sample_distinguishment(data, ctx, cfg.sd, timer)
        # the encoder's own head is untrained here, so the stage is not measured
        encoder = timer.run("ss_ctl", cfg.ctl_epochs, lambda: train_extractor(data, split, ctx, cfg),
                            model_of=lambda encoder: None)
        model = timer.run("mixed_ce", cfg.cls_epochs, lambda: train_classifier(encoder, data, split, ctx, cfg))
        notes = [f"SD split: {int(split.clean.sum())} trusted clean, {int(split.poisoned.sum())} suspected "
                 f"poisoned, {int(split.uncertain.sum())} uncertain (dropped by the classifier); "
                 f"{'strict' if cfg.strict_positives else 'row-only'} positive mask; last epoch returned"]
        return DefenseResult(model, suspicion=split.scores, flagged=split.poisoned, trusted=split.clean,
                             stages=timer.records, notes=notes)
