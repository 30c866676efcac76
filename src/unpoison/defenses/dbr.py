"""D-BR: remove a backdoor from a trained model (Chen, Wu & Wang, NeurIPS 2022; spec §3.8).

    1. SD module (detect/fct.py) on the untrusted set: trusted-clean D_c (lowest 20 % FCT)
       and suspected-poisoned D_p (highest 5 %). It uses its own quick model, never the
       model being repaired (official code and BackdoorBench agree).
    2. For up to 20 epochs, with one SGD optimiser (lr 1e-4, shared momentum) and crop+flip:
         unlearn: one pass over D_p minimising -CE (gradient ascent),
         relearn: one pass over D_c minimising CE.
       This is train/unlearn.py's alternating loop. `paper` runs it as the official code
       does (BatchNorm in train mode, unbounded -CE, all epochs); `quick` with our guards,
       each a setting of `unlearn` (why, and what each measured: that module's doc and
       benchmarks/RESULTS.md, "D-BR's ascent pass" and "D-BR's stop rules"):
       `unlearn.batchnorm=running`, `unlearn.loss=complement`, `unlearn.bound=1` (CE clipped
       at chance, ln C), `unlearn.stop=unlearned` and `unlearn.stall_epochs=2`.
    3. The last epoch is the result (the official script picks the epoch with the best test
       CA - ASR, which needs the test labels and the trigger: that is model selection on
       the test set, so we do not).

In `unpoison run` the model to repair is trained by the run: the paper's (ResNet-18 with
stem max-pool, 200 epochs) in `paper`, the profile's no-defence model (trained once, cached
and shared with `--defense none`) otherwise. `repair()` takes any model, for `unpoison
repair` on a model the user brings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from torch import nn

from ..data.imageset import ImageSet
from ..detect.fct import SampleSplit, SDConfig, sample_distinguishment
from ..profiles import get_profile
from ..train.engine import OptimConfig
from ..train.supervised import TrainConfig
from ..train.unlearn import UnlearnConfig, describe, unlearn
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from ..context import train_standard


def official_loop() -> UnlearnConfig:
    """The official BR loop: 20 epochs of (ascent on D_p with -CE, descent on D_c), SGD lr 1e-4
    (constant), momentum 0.9, wd 5e-4, batch 128, crop+flip, BatchNorm in train mode."""
    return UnlearnConfig.plain_ascent(
        epochs=20, batch_size=128, augment="weak", mode="alternate",
        optim=OptimConfig(lr=1e-4, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))


def official_backdoored() -> TrainConfig:
    """The model the official protocol repairs: 200 epochs, SGD lr 0.01, momentum 0.9, wd 5e-4,
    MultiStepLR [100, 150] x 0.1, batch 128, crop+flip."""
    return TrainConfig(epochs=200, batch_size=128, augment="weak", optim=OptimConfig(
        lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="multistep", milestones=(100, 150)))


@dataclass
class DBRConfig:
    """D-BR. paper = the official code (network, backdoored model, loop). quick: our guarded
    loop (module doc), the SD module and the repaired model on the run's `--model`.
    smoke: 10 epochs at lr 1e-3, batch 32."""

    sd: SDConfig = field(default_factory=SDConfig)
    unlearn: UnlearnConfig = field(default_factory=official_loop)
    # the backdoored model `unpoison run` trains and repairs: `model` None = the run's --model;
    # with the run's model and the profile's no-defence recipe it is shared with --defense none
    model: str | None = None
    backdoored: TrainConfig = field(default_factory=official_backdoored)

    @classmethod
    def for_profile(cls, profile: str) -> "DBRConfig":
        sd = SDConfig.for_profile(profile)
        if profile == "paper":
            return cls(sd=sd, model="resnet18-maxpool", backdoored=official_backdoored())
        guarded = replace(official_loop(), batchnorm="running", loss="complement", bound=1.0, stop="unlearned",
                          stall_epochs=2)
        baseline = get_profile(profile).baseline
        if profile == "quick":
            return cls(sd=sd, unlearn=guarded, backdoored=baseline)
        if profile == "smoke":
            return cls(sd=sd, backdoored=baseline,
                       unlearn=replace(guarded, epochs=10, batch_size=32, optim=replace(guarded.optim, lr=1e-3)))
        raise ValueError(f"unknown profile {profile!r}")


def unlearn_relearn(model: nn.Module, data: ImageSet, split: SampleSplit, ctx: DefenseContext,
                    cfg: UnlearnConfig, name: str = "dbr") -> nn.Module:
    """The BR module: alternate unlearning of D_p and relearning of D_c; returns the last epoch."""
    return unlearn(model, data.subset(split.poisoned), cfg, ctx.runtime, trusted=data.subset(split.clean), name=name,
                   seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                   on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)


def repair(model: nn.Module, data: ImageSet, ctx: DefenseContext, config: DBRConfig | None = None,
           timer: StageTimer | None = None) -> DefenseResult:
    """Remove a backdoor from `model` using the untrusted set it was trained on (or one like it).

    The model is copied, never modified in place. The result carries the repaired model,
    the FCT scores as suspicion and the suspected-poisoned split as flagged."""
    config = config or DBRConfig.for_profile(ctx.profile)
    timer = timer or StageTimer(ctx)
    split = sample_distinguishment(data, ctx, config.sd, timer)
    # a copy with gradients on: a trained model may come back frozen (an EMA copy)
    model = copy.deepcopy(model).requires_grad_(True)
    repaired = timer.run("unlearn_relearn", config.unlearn.epochs,
                         lambda: unlearn_relearn(model, data, split, ctx, config.unlearn))
    notes = [f"SD split: {int(split.clean.sum())} trusted clean, {int(split.poisoned.sum())} suspected poisoned, "
             f"{int(split.uncertain.sum())} uncertain; loop: {describe(config.unlearn)}; last epoch returned"]
    return DefenseResult(repaired, suspicion=split.scores, flagged=split.poisoned, trusted=split.clean,
                         stages=timer.records, notes=notes)


class DBR(Defense):
    name = "dbr"
    Config = DBRConfig
    main_epochs = "unlearn.epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        timer = StageTimer(ctx)
        cfg: DBRConfig = self.config
        # the backdoored model to repair: the paper's, or the run's no-defence model (shared with --defense none)
        backdoored = timer.run("train", cfg.backdoored.epochs,
                               lambda: train_standard(data, ctx, cfg.backdoored, model=cfg.model))
        return repair(backdoored, data, ctx, cfg, timer)
