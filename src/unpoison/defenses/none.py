"""No defence: train on the untrusted data as if it were clean (the baseline every
defence is compared against, and the backdoored model D-BR repairs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.imageset import ImageSet
from ..profiles import get_profile
from ..context import train_standard  # noqa: F401  (defined below the packages; imported from here by older code)
from ..train.supervised import TrainConfig
from .base import Defense, DefenseContext, DefenseResult, StageTimer


@dataclass
class NoDefenseConfig:
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def for_profile(cls, profile: str) -> "NoDefenseConfig":
        return cls(get_profile(profile).baseline)


class NoDefense(Defense):
    name = "none"
    Config = NoDefenseConfig

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        timer = StageTimer(ctx)
        model = timer.run("train", self.config.train.epochs, lambda: train_standard(data, ctx, self.config.train))
        return DefenseResult(model, stages=timer.records)
