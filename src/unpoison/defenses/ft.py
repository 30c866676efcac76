"""FT: fine-tune the backdoored model on a small clean set (the baseline of Liu et al.,
RAID 2018, and of NAD, ANP and the FCT paper).

    1. start from the backdoored model;
    2. train it with cross-entropy on the clean reference (crop + flip), SGD;
    3. return the last epoch (no checkpoint is picked on the test set).

Fine-tuning alone leans on catastrophic forgetting: a small learning rate keeps CA and
often the backdoor too; NAD's teacher is this same step at lr 0.1 then 0.01 for 10 epochs
(NAD's code: batch 64, Nesterov, wd 1e-4, lr 0.1 for two epochs then 0.01), which is the
`paper` recipe here. `quick` is the same recipe (2,500 images x 10 epochs is cheap).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..data.imageset import ImageSet
from ..train.engine import OptimConfig
from ..train.supervised import TrainConfig, train_supervised
from .base import DefenseContext, DefenseResult, StageTimer
from .posttraining import PostTrainingRepair, clean_accuracy, trainable_copy


def nad_schedule(epochs: int) -> OptimConfig:
    """NAD's code: lr 0.1 for the first two epochs, then 0.01; SGD Nesterov 0.9, wd 1e-4."""
    return OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule="multistep",
                       milestones=(min(2, epochs),), gamma=0.1)


def smoke_schedule(lr: float = 0.02) -> OptimConfig:
    """Tests: a hundred toy images do not survive lr 0.1; a constant lower one."""
    return OptimConfig(lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule="constant")


def fine_tune_recipe(profile: str, smoke_lr: float = 0.02) -> TrainConfig:
    """FT's recipe, NAD's fine-tune (10 epochs of batch 64, crop + flip, `nad_schedule`): also
    FP's fine-tune, NAD's teacher and MCR's second endpoint. `smoke`: 3 epochs of batch 32 at
    a constant `smoke_lr`."""
    if profile == "smoke":
        return TrainConfig(epochs=3, batch_size=32, augment="weak", optim=smoke_schedule(smoke_lr))
    return TrainConfig(epochs=10, batch_size=64, augment="weak", optim=nad_schedule(10))


@dataclass
class FTConfig:
    train: TrainConfig = field(default_factory=lambda: fine_tune_recipe("paper"))
    min_clean: int = 100      # below this a fine-tune overfits a handful of images per class

    @classmethod
    def for_profile(cls, profile: str) -> "FTConfig":
        if profile == "smoke":
            return cls(train=fine_tune_recipe("smoke"), min_clean=20)
        return cls()


def fine_tune(model: nn.Module, clean: ImageSet, cfg: TrainConfig, ctx: DefenseContext, name: str,
              copy: bool = True) -> nn.Module:
    """Cross-entropy training of (a copy of) `model` on the clean reference; last epoch returned."""
    return train_supervised(trainable_copy(model) if copy else model.requires_grad_(True), clean, cfg, ctx.runtime, name=name, seed=ctx.seed,
                            checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                            on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)


class FT(PostTrainingRepair):
    name = "ft"
    Config = FTConfig
    main_epochs = "train.epochs"

    def repair_stages(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, timer: StageTimer) -> DefenseResult:
        cfg = self.config
        tuned = timer.run("finetune", cfg.train.epochs, lambda: fine_tune(model, clean, cfg.train, ctx, "finetune"))
        return DefenseResult(tuned, stages=timer.records,
                             notes=[f"fine-tuned {cfg.train.epochs} epochs; last epoch returned; "
                                    f"clean-reference accuracy {clean_accuracy(tuned, clean, ctx):.4f}"])
