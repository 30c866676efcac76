"""D-BR: remove a backdoor from a trained model (Chen, Wu & Wang, NeurIPS 2022; spec §3.8).

    1. SD module (detect/fct.py) on the untrusted set: trusted-clean D_c (lowest 20 % FCT)
       and suspected-poisoned D_p (highest 5 %). It uses its own quick model, never the
       model being repaired (official code and BackdoorBench agree).
    2. For 20 epochs, with one SGD optimiser (lr 1e-4, shared momentum) and crop+flip:
         unlearn: one pass over D_p minimising -CE (gradient ascent),
         relearn: one pass over D_c minimising CE.
    3. The last epoch is the result (the official script picks the epoch with the best test
       CA - ASR, which needs the test labels and the trigger: that is model selection on
       the test set, so we do not).

In `unpoison run` the model to repair is the no-defence model of the same run (trained
once, cached and shared with `--defense none`). `repair()` takes any model, for
`unpoison repair` on a model the user brings.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..detect.fct import SampleSplit, SDConfig, sample_distinguishment
from ..profiles import get_profile
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from .none import train_standard

MODES = ("alternate", "unlearn", "relearn")


@dataclass
class DBRConfig:
    """D-BR. paper = the official code. quick: the SD module on the run's model (WRN-16-1),
    the paper's 20 alternating epochs at lr 1e-4. smoke: 3 epochs at lr 1e-2, batch 32."""

    sd: SDConfig = field(default_factory=SDConfig)
    epochs: int = 20
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-4, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
    augment: str = "weak"           # RandomCrop(pad 4) + flip for both passes
    # ablation (poster, "effectiveness of BR"): alternate = unlearn + relearn (the method),
    # unlearn = ascent on D_p only, relearn = descent on D_c only
    mode: str = "alternate"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"D-BR mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    @classmethod
    def for_profile(cls, profile: str) -> "DBRConfig":
        sd = SDConfig.for_profile(profile)
        if profile in ("paper", "quick"):
            return cls(sd=sd)
        if profile == "smoke":
            return cls(sd=sd, epochs=3, batch_size=32,
                       optim=OptimConfig(lr=1e-2, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
        raise ValueError(f"unknown profile {profile!r}")


def unlearn_relearn_epoch(suspected: DeviceData, trusted: DeviceData, cfg: DBRConfig):
    """An epoch_fn: one ascent pass over the suspected set, then one descent pass over the
    trusted set, on the same optimiser (the official loop)."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        def ascent(index: torch.Tensor) -> torch.Tensor:
            x, y = suspected.batch(index, cfg.augment, g)
            return -F.cross_entropy(engine.model(x), y)

        def descent(index: torch.Tensor) -> torch.Tensor:
            x, y = trusted.batch(index, cfg.augment, g)
            return F.cross_entropy(engine.model(x), y)

        out = {}
        if cfg.mode in ("alternate", "unlearn"):
            out["unlearn_loss"] = -engine.run_pass(batch_indices(len(suspected), cfg.batch_size, g), ascent, "unlearn")
        if cfg.mode in ("alternate", "relearn"):
            out["relearn_loss"] = engine.run_pass(batch_indices(len(trusted), cfg.batch_size, g), descent, "relearn")
        return out

    return epoch_fn


def unlearn_relearn(model: nn.Module, data: ImageSet, split: SampleSplit, ctx: DefenseContext,
                    cfg: DBRConfig, name: str = "dbr") -> nn.Module:
    """The BR module: alternate unlearning of D_p and relearning of D_c; returns the last epoch."""
    suspected = DeviceData(data.subset(split.poisoned), ctx.runtime)
    trusted = DeviceData(data.subset(split.clean), ctx.runtime)
    steps = (-(-len(suspected) // cfg.batch_size) * (cfg.mode != "relearn")
             + -(-len(trusted) // cfg.batch_size) * (cfg.mode != "unlearn"))
    engine = Engine(model, cfg.optim, ctx.runtime, name=name, epochs=cfg.epochs, steps_per_epoch=steps,
                    seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                    on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)
    return engine.fit(unlearn_relearn_epoch(suspected, trusted, cfg)).eval()


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
    repaired = timer.run("unlearn_relearn", config.epochs, lambda: unlearn_relearn(model, data, split, ctx, config))
    notes = [f"SD split: {int(split.clean.sum())} trusted clean, {int(split.poisoned.sum())} suspected poisoned, "
             f"{int(split.uncertain.sum())} uncertain; D-BR mode {config.mode}; last epoch returned"]
    return DefenseResult(repaired, suspicion=split.scores, flagged=split.poisoned, trusted=split.clean,
                         stages=timer.records, notes=notes)


class DBR(Defense):
    name = "dbr"
    Config = DBRConfig
    main_epochs = "epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        timer = StageTimer(ctx)
        # the backdoored model to repair: the run's no-defence model, shared with --defense none
        baseline = get_profile(ctx.profile).baseline
        backdoored = timer.run("train", baseline.epochs, lambda: train_standard(data, ctx, baseline))
        return repair(backdoored, data, ctx, self.config, timer)
