"""ASD: backdoor defence via adaptive splitting (Gao et al., CVPR 2023).

One semi-supervised training run in which the labelled ("clean") pool is re-chosen before
every epoch from per-sample symmetric cross-entropy losses (SCE, alpha 0.1, beta 1, as
DBD) of the model being trained; the rest of the data trains unlabelled:
    epochs [0, T1)   class-aware loss-guided split: a clean seed of 10 images per class
                     plus, per class, the n lowest-loss samples, n growing by 10 every
                     5 epochs (of the paper's 60);
    epochs [T1, T2)  class-agnostic loss-guided split: the 50 % lowest-loss samples;
    epochs [T2, T)   meta-split: a virtual copy of the model takes one epoch of plain CE on
                     the whole untrusted set (Adam, lr 0.015, last residual group and head
                     only); the 50 % samples whose loss it lowered least form the clean pool
                     (poisoned samples are fitted fastest, so their loss drops most).
Paper: T1 = 60, T2 = 90, T = 120 epochs of 1024 MixMatch steps each.

The clean seed is the only clean knowledge: 10 images per class drawn from the run's clean
reference (`ctx.clean_reference`, unpoisoned images; `--clean DIR` for a folder user).
Substitution, stated: FixMatch (train/fixmatch.py, its SGD recipe) where the paper uses
MixMatch (Adam, lr 0.002, lambda_u 15). The last epoch is returned (the official script
keeps the epoch with the best test accuracy). `quick`: T = 8 epochs (T1 = 4, T2 = 6) of
120 FixMatch steps; the seed growth is mapped onto the shorter schedule.

The suspicion reported is the SCE loss (the loss-guided signal); the meta-split decides the
last pools. On the tests' toy backdoor the virtual epoch does not learn the trigger, so the
meta-split there admits the poisoned images to the clean pool (measured, tests/test_dbd_asd.py
only checks the final ASR and the loss ranking).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..distributed import average_gradients
from ..runtime import generator
from ..train.engine import Engine
from ..train.fixmatch import FixMatchConfig, fixmatch_epoch
from ..train.supervised import DeviceData, predict
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from .dbd import symmetric_ce
from .posttraining import check_clean_reference


def semi_recipe(profile: str) -> FixMatchConfig:
    if profile == "paper":
        return FixMatchConfig(epochs=120, steps_per_epoch=1024, batch_size=64, mu=7)
    if profile == "quick":
        return FixMatchConfig(epochs=8, steps_per_epoch=120, batch_size=64, mu=3, ema_decay=0.99)
    return FixMatchConfig(epochs=4, steps_per_epoch=12, batch_size=16, mu=2, ema_decay=0.9)


@dataclass
class ASDConfig:
    semi: FixMatchConfig = field(default_factory=lambda: semi_recipe("paper"))
    class_aware_until: float = 0.5     # T1 / T
    agnostic_until: float = 0.75       # T2 / T
    seed_per_class: int = 10
    growth: int = 10                   # per class, every `growth_every` of the paper's epochs
    growth_every: int = 5
    paper_class_aware_epochs: int = 60
    clean_ratio: float = 0.5           # share of the data in the clean pool from T1 on
    meta_lr: float = 0.015
    meta_batch_size: int = 128
    meta_augment: str = "weak"         # the training transform (crop + flip), as the official code
    sce_alpha: float = 0.1
    sce_beta: float = 1.0

    @property
    def min_clean(self) -> int:
        return self.seed_per_class

    @classmethod
    def for_profile(cls, profile: str) -> "ASDConfig":
        if profile == "smoke":
            # tests: the toy's corner trigger moves under a flip, so the virtual epoch is un-augmented
            return cls(semi=semi_recipe("smoke"), seed_per_class=5, meta_batch_size=32, meta_augment="none")
        return cls(semi=semi_recipe(profile))

    def phase(self, epoch: int) -> str:
        if epoch < self.class_aware_until * self.semi.epochs:
            return "class-aware"
        if epoch < self.agnostic_until * self.semi.epochs:
            return "agnostic"
        return "meta"

    def per_class(self, epoch: int) -> int:
        """n of the class-aware split: the paper's 10 more every 5 of its 60 epochs, mapped."""
        t1 = max(self.class_aware_until * self.semi.epochs, 1e-9)
        return self.growth * int(epoch * self.paper_class_aware_epochs / t1 // self.growth_every)


def draw_seed(clean: ImageSet, per_class: int, seed: int) -> ImageSet:
    """`per_class` images of every class from the clean reference."""
    g = generator(seed, "asd-seed")
    picks = []
    for c in range(clean.num_classes):
        members = (clean.labels == c).nonzero().flatten()
        if len(members) < per_class:
            raise ValueError(f"ASD needs a clean seed of {per_class} images per class; the clean reference "
                             f"has {len(members)} of class {clean.classes[c]!r}")
        picks.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return clean.subset(torch.cat(picks))


@torch.no_grad()
def sce_losses(model: nn.Module, data: ImageSet, ctx: DefenseContext, cfg: ASDConfig) -> torch.Tensor:
    logits = predict(model, data.images, ctx.runtime)
    return symmetric_ce(logits, data.labels, cfg.sce_alpha, cfg.sce_beta, reduction="none")


def class_aware_pool(losses: torch.Tensor, labels: torch.Tensor, num_classes: int, n: int) -> torch.Tensor:
    pool = torch.zeros(len(losses), dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        pool[members[losses[members].argsort()[:n]]] = True
    return pool


def lowest(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    pool = torch.zeros(len(scores), dtype=torch.bool)
    pool[scores.argsort()[: int(len(scores) * ratio)]] = True
    return pool


def meta_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the virtual model updates: the last residual group and the head (the paper's
    layer4 + linear of ResNet-18), or the head alone for other networks."""
    if hasattr(model, "block3"):
        return list(model.block3.parameters()) + list(model.head.parameters())
    if hasattr(model, "layers") and len(model.layers) == 8:
        return [p for block in model.layers[6:] for p in block.parameters()] + list(model.head.parameters())
    return list(model.head.parameters())


def loss_reduction(model: nn.Module, data: ImageSet, losses: torch.Tensor, ctx: DefenseContext, cfg: ASDConfig,
                   g: torch.Generator) -> torch.Tensor:
    """The meta-split's measure: each sample's SCE loss minus its loss after the virtual
    model's one epoch of CE on the whole untrusted set."""
    virtual = copy.deepcopy(model).requires_grad_(True).train()
    optimizer = torch.optim.Adam(meta_parameters(virtual), lr=cfg.meta_lr)
    device_data = DeviceData(data, ctx.runtime)
    for index in batch_indices(len(data), cfg.meta_batch_size, g):
        x, y = device_data.batch(index, cfg.meta_augment, g)
        with ctx.runtime.autocast():
            loss = F.cross_entropy(virtual(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients([p.grad for p in virtual.parameters()])   # under torchrun (see distributed.py)
        optimizer.step()
    return losses - sce_losses(virtual.eval(), data, ctx, cfg)


class ASD(Defense):
    name = "asd"
    Config = ASDConfig
    main_epochs = "semi.epochs"
    needs_clean_reference = True

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg, timer = self.config, StageTimer(ctx)
        clean = check_clean_reference(ctx.clean_reference, data.num_classes, cfg.seed_per_class * data.num_classes,
                                      "ASD")
        seed = draw_seed(clean, cfg.seed_per_class, ctx.seed)
        # the seed is labelled throughout; the untrusted set is split around it
        combined = ImageSet(torch.cat([seed.images, data.images]), torch.cat([seed.labels, data.labels]),
                            list(data.classes))
        n_seed = len(seed)
        state: dict = {}
        model = timer.run("semi", cfg.semi.epochs, lambda: self._train(combined, n_seed, ctx, state))
        suspicion, pool = state["suspicion"][n_seed:], state["pool"][n_seed:]
        return DefenseResult(model, suspicion=suspicion, flagged=~pool, trusted=pool, stages=timer.records,
                             notes=[f"clean seed {n_seed} images ({cfg.seed_per_class} per class) from the clean "
                                    f"reference; last split ({state['phase']}): {int(pool.sum())} untrusted samples "
                                    "labelled; FixMatch for MixMatch; last epoch returned"])

    def _train(self, data: ImageSet, n_seed: int, ctx: DefenseContext, state: dict) -> nn.Module:
        cfg = self.config
        is_seed = torch.arange(len(data)) < n_seed
        model = ctx.new_model(data, role="asd")
        engine = Engine(model, cfg.semi.optim, ctx.runtime, name="asd", epochs=cfg.semi.epochs,
                        steps_per_epoch=cfg.semi.steps(len(data)), seed=ctx.seed, checkpoint_dir=ctx.checkpoints(),
                        ema_decay=cfg.semi.ema_decay, log_path=ctx.log_path, on_epoch_end=ctx.epoch_hook("semi"),
                        progress=ctx.progress)

        def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
            pool, suspicion, phase = self._split(engine.model, data, is_seed, epoch, ctx, g)
            state.update(pool=pool, suspicion=suspicion, phase=phase)
            engine.model.train()
            labelled = data.subset(pool)
            out = fixmatch_epoch(labelled.images, labelled.labels, data.images[~pool], cfg.semi, ctx.runtime)(
                engine, epoch, g)
            return {**out, "split": phase, "labelled": int(pool.sum())}

        model = engine.fit(epoch_fn).eval()
        if "pool" not in state:   # resumed after the last epoch: the split of the finished model
            pool, suspicion, phase = self._split(engine.model, data, is_seed, cfg.semi.epochs - 1, ctx,
                                                 generator(ctx.seed, "asd-final-split"))
            state.update(pool=pool, suspicion=suspicion, phase=phase)
        return model

    def _split(self, model: nn.Module, data: ImageSet, is_seed: torch.Tensor, epoch: int, ctx: DefenseContext,
               g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
        """(clean pool, suspicion, phase) for this epoch; the seed is always in the pool. The
        suspicion is the SCE loss in every phase (the loss-guided signal; the meta-split's loss
        reduction decides the pool but is not a ranking the paper gives)."""
        cfg, phase = self.config, self.config.phase(epoch)
        losses = sce_losses(model, data, ctx, cfg)
        if phase == "class-aware":
            n = cfg.per_class(epoch)
            pool = class_aware_pool(losses.masked_fill(is_seed, float("inf")), data.labels, data.num_classes, n)
            pool &= ~is_seed
            suspicion = losses
        elif phase == "agnostic":
            pool, suspicion = lowest(losses, cfg.clean_ratio), losses
        else:
            pool = lowest(loss_reduction(model, data, losses, ctx, cfg, g), cfg.clean_ratio)
            suspicion = losses
        return pool | is_seed, suspicion, phase
