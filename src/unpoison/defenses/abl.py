"""ABL: anti-backdoor learning (Li et al., NeurIPS 2021; spec §4), the baseline DLP is built on.

    isolation  train on the whole untrusted set with the LGA loss (detect/loss.py) for
               T_te epochs; backdoor samples are fitted fast and held at loss gamma.
    isolate    the p = 1 % lowest-loss samples form D_b, the rest D_c.
    stage 2    mode 'sequential' (the official code): fine-tune the isolation model on
               D_c with augmentation, then unlearn: gradient ascent on D_b at a small lr.
               mode 'joint' (the paper): T - T_te epochs of  CE(D_c) - CE(D_b)  together.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..data.batches import batch_indices, endless_indices
from ..data.imageset import ImageSet
from ..detect.loss import LossConfig, LossDetector, abl_optim, per_sample_loss
from ..profiles import get_profile
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData, TrainConfig, train_supervised
from ..train.unlearn import UnlearnConfig, unlearn
from .base import Defense, DefenseContext, DefenseResult, StageTimer


def finetune_recipe(profile: str) -> TrainConfig:
    """Official code: 60 epochs, SGD Nesterov 0.9, wd 1e-4, lr 0.1 then 0.01 from epoch 40,
    crop + flip + Cutout(1 hole, length 3), batch 128. quick/smoke: the profile's own
    clean-training recipe (so ABL costs one clean training plus the isolation epochs)."""
    if profile == "paper":
        return TrainConfig(epochs=60, batch_size=128, augment="weak+cutout",
                           optim=abl_optim(0.1, "multistep", milestones=(40,), gamma=0.1))
    return get_profile(profile).baseline


def unlearn_recipe(profile: str) -> UnlearnConfig:
    """Official code: SGD Nesterov lr 5e-4 (constant), momentum 0.9, wd 1e-4, batch 128, no
    augmentation, 5 epochs (BatchNorm in train mode, as the code runs it)."""
    return UnlearnConfig.plain_ascent(epochs=5, batch_size=64 if profile == "smoke" else 128, augment="none",
                                      optim=abl_optim(5e-4, "constant"))


@dataclass
class ABLConfig:
    isolation: LossConfig = field(default_factory=LossConfig)
    mode: str = "sequential"                 # sequential (official code) | joint (paper)
    finetune: TrainConfig = field(default_factory=lambda: finetune_recipe("paper"))
    unlearn: UnlearnConfig = field(default_factory=lambda: unlearn_recipe("paper"))
    # joint mode: T - T_te = 80 epochs over D_c, each step also ascending on a D_b batch
    joint_epochs: int = 80
    joint_optim: OptimConfig = field(default_factory=lambda: abl_optim(0.1, "multistep", milestones=(40,)))

    @classmethod
    def for_profile(cls, profile: str) -> "ABLConfig":
        cfg = cls(isolation=LossConfig.for_profile(profile), finetune=finetune_recipe(profile),
                  unlearn=unlearn_recipe(profile))
        if profile == "paper":
            return cfg
        # the joint form scaled like the fine-tune: cosine over fewer epochs
        return replace(cfg, joint_epochs=cfg.finetune.epochs, joint_optim=abl_optim(0.1, "cosine"))


class ABL(Defense):
    name = "abl"
    Config = ABLConfig
    main_epochs = "finetune.epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg, timer = self.config, StageTimer(ctx)
        if cfg.mode not in ("sequential", "joint"):
            raise ValueError(f"ABL mode must be 'sequential' or 'joint', got {cfg.mode!r}")
        detector = LossDetector(cfg.isolation)
        model = timer.run("isolation", cfg.isolation.train.epochs, lambda: detector.train_model(data, ctx))
        losses = timer.run("isolate", 0, lambda: per_sample_loss(model, data, ctx.runtime))
        isolated = detector.flag(losses)
        clean, backdoor = data.subset(~isolated), data.subset(isolated)

        if cfg.mode == "sequential":
            if cfg.finetune.epochs > 0:
                model = timer.run("finetune", cfg.finetune.epochs, lambda: train_supervised(
                    model, clean, cfg.finetune, ctx.runtime, name="finetune", seed=ctx.seed,
                    checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path, on_epoch_end=ctx.epoch_hook("finetune"),
                    progress=ctx.progress))
            model = timer.run("unlearn", cfg.unlearn.epochs, lambda: unlearn(
                model, backdoor, cfg.unlearn, ctx.runtime, name="unlearn", seed=ctx.seed,
                checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path, on_epoch_end=ctx.epoch_hook("unlearn"),
                progress=ctx.progress))
        else:
            model = timer.run("unlearn", cfg.joint_epochs, lambda: self._joint(model, clean, backdoor, ctx))
        return DefenseResult(model, suspicion=-losses, flagged=isolated, stages=timer.records,
                             notes=[f"isolated {int(isolated.sum())} samples ({cfg.isolation.loss} loss)"])

    def _joint(self, model, clean: ImageSet, backdoor: ImageSet, ctx: DefenseContext):
        """The paper's stage 2: minimise CE on D_c minus CE on D_b, one batch of each per step."""
        cfg = self.config
        batch = cfg.finetune.batch_size
        clean_data, backdoor_data = DeviceData(clean, ctx.runtime), DeviceData(backdoor, ctx.runtime)

        def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
            backdoor_stream = endless_indices(len(backdoor_data), batch, g)
            batches = [(i, next(backdoor_stream)) for i in batch_indices(len(clean_data), batch, g)]

            def loss_fn(pair):
                x, y = clean_data.batch(pair[0], cfg.finetune.augment, g)
                xb, yb = backdoor_data.batch(pair[1], "none", g)
                return F.cross_entropy(engine.model(x), y) - F.cross_entropy(engine.model(xb), yb)

            engine.run_pass(batches, loss_fn)

        engine = Engine(model, cfg.joint_optim, ctx.runtime, name="unlearn", epochs=cfg.joint_epochs,
                        steps_per_epoch=-(-len(clean) // batch), seed=ctx.seed, checkpoint_dir=ctx.checkpoints(),
                        log_path=ctx.log_path, on_epoch_end=ctx.epoch_hook("unlearn"), progress=ctx.progress)
        return engine.fit(epoch_fn).eval()
