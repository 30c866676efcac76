"""Loss-based isolation, ABL's stage 1 (Li et al., NeurIPS 2021; spec §4).

Train on the whole untrusted set with a loss that will not let any sample's loss fall
below gamma: local gradient ascent (LGA), sign(l - gamma) * l. Clean samples are learned
slowly and stay above gamma; backdoor samples are learned fast, hit gamma and are held
there, so after T_te epochs the lowest-loss samples are mostly poisoned.
Suspicion = -CE of each training image (eval mode, un-augmented).

loss variants:
  lga         per-sample LGA, the paper's expectation (default);
  lga_batch   LGA on the batch-mean loss, as the official code applies it;
  flooding    |mean loss - b| + b, the official code's default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..config import to_plain
from ..context import DefenseContext
from ..runtime import Runtime
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData, TrainConfig, predict
from .base import Detection, Detector

LOSSES = ("lga", "lga_batch", "flooding")


def abl_optim(lr: float, schedule: str, **changes) -> OptimConfig:
    """The optimiser of every stage of ABL's official code: SGD with Nesterov momentum 0.9 and
    wd 1e-4; the stages differ in lr and schedule."""
    return OptimConfig(lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4, schedule=schedule, **changes)


def isolation_recipe(profile: str) -> TrainConfig:
    """ABL's isolation training: SGD Nesterov lr 0.1, momentum 0.9, wd 1e-4, batch 128, no
    augmentation (official code). T_te = 20 epochs (paper; the code uses 10).
    quick: 5 epochs - the backdoor is fitted within one or two, which is what isolation needs."""
    optim = abl_optim(0.1, "constant")
    epochs = {"paper": 20, "quick": 5, "smoke": 2}[profile]
    return TrainConfig(epochs=epochs, batch_size=64 if profile == "smoke" else 128, augment="none", optim=optim)


@dataclass
class LossConfig:
    train: TrainConfig = field(default_factory=lambda: isolation_recipe("paper"))
    loss: str = "lga"
    gamma: float = 0.5              # LGA threshold / flooding level b
    isolation_rate: float = 0.01    # p: the lowest-loss fraction is isolated

    @classmethod
    def for_profile(cls, profile: str) -> "LossConfig":
        return cls(train=isolation_recipe(profile))


def isolation_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    if kind == "lga":
        return (torch.sign(per_sample - gamma) * per_sample).mean()
    mean = per_sample.mean()
    if kind == "lga_batch":
        return torch.sign(mean - gamma) * mean
    if kind == "flooding":
        return (mean - gamma).abs() + gamma
    raise ValueError(f"unknown isolation loss {kind!r}; choose one of {', '.join(LOSSES)}")


def isolation_epoch(data: DeviceData, cfg: LossConfig):
    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = data.batch(index, cfg.train.augment, g)
            return isolation_loss(engine.model(x), y, cfg.loss, cfg.gamma)

        engine.run_pass(batch_indices(len(data), cfg.train.batch_size, g), loss_fn)

    return epoch_fn


def per_sample_loss(model: nn.Module, data: ImageSet, runtime: Runtime) -> torch.Tensor:
    return F.cross_entropy(predict(model, data.images, runtime), data.labels, reduction="none")


class LossDetector(Detector):
    """Suspicion = -CE under an LGA/flooding-trained isolation model; flagged = lowest p."""

    name = "loss"
    Config = LossConfig

    def train_model(self, data: ImageSet, ctx: DefenseContext, stage: str = "isolation") -> nn.Module:
        cfg = self.config

        def build() -> nn.Module:
            steps = -(-len(data) // cfg.train.batch_size)
            engine = Engine(ctx.new_model(data, role="abl-isolation"), cfg.train.optim, ctx.runtime, name=stage,
                            epochs=cfg.train.epochs, steps_per_epoch=steps, seed=ctx.seed,
                            checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                            on_epoch_end=ctx.epoch_hook(stage), progress=ctx.progress)
            return engine.fit(isolation_epoch(DeviceData(data, ctx.runtime), cfg)).eval()

        if ctx.shared_model is not None:
            return ctx.shared_model({"stage": "loss-isolation", "recipe": to_plain(cfg)}, build)
        return build()

    def flag(self, losses: torch.Tensor) -> torch.Tensor:
        n_isolated = max(1, int(round(len(losses) * self.config.isolation_rate)))
        flagged = torch.zeros(len(losses), dtype=torch.bool)
        flagged[torch.argsort(losses, stable=True)[:n_isolated]] = True
        return flagged

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:
        model = self.train_model(data, ctx)
        losses = per_sample_loss(model, data, ctx.runtime)
        return Detection(scores=-losses, flagged=self.flag(losses), model=model)
