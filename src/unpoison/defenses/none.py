"""No defence: train on the untrusted data as if it were clean (the baseline every
defence is compared against, and the backdoored model D-BR repairs)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..data.imageset import ImageSet
from ..profiles import get_profile
from ..runtime import generator
from ..train.supervised import TrainConfig, train_supervised
from .base import Defense, DefenseContext, DefenseResult, StageTimer, to_plain


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


def train_standard(data: ImageSet, ctx: DefenseContext, cfg: TrainConfig, name: str = "train",
                   model: str | None = None, fraction: float = 1.0):
    """Plain training with the profile's recipe (shared through ctx.shared_model when given);
    `model` names an architecture other than the run's --model; `fraction` < 1 trains on a
    seeded random share of the set (one pass of it = that fraction of an epoch)."""
    def build():
        train = data.head(round(fraction * len(data)), generator(ctx.seed, name, "fraction")) if fraction < 1 else data
        return train_supervised(ctx.new_model(data, model), train, cfg, ctx.runtime, name=name, seed=ctx.seed,
                                checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                                on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)
    if ctx.shared_model is not None and model in (None, ctx.model_name):
        key = {"stage": name, "recipe": to_plain(cfg), **({"fraction": fraction} if fraction < 1 else {})}
        return ctx.shared_model(key, build)
    return build()
