"""Profiles: how big a run is.

paper  the papers' settings (for a GPU).
quick  sized for a 2-core CPU: the full training set, far fewer epochs. Every output of
       a quick run says so; its numbers are not the papers' numbers.
smoke  seconds: a few hundred images, for tests.

A profile fixes the data sizes and the no-defence training recipe; every defence has
its own per-profile config next to its code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, TypeVar

from .train.engine import OptimConfig
from .train.supervised import TrainConfig

PROFILES = ("smoke", "quick", "paper")


@dataclass(frozen=True)
class Profile:
    name: str
    note: str
    train_subset: int | None
    test_subset: int | None
    baseline: TrainConfig
    monitor_every_epoch: bool


def get_profile(name: str) -> Profile:
    if name == "paper":
        return Profile(
            "paper", "paper profile: the papers' settings (100-epoch baselines); meant for a GPU",
            None, None,
            TrainConfig(epochs=100, batch_size=128, augment="weak",
                        optim=OptimConfig(lr=0.1, weight_decay=5e-4, schedule="cosine")),
            True)
    if name == "quick":
        return Profile(
            "quick", "quick profile: full training set, epochs scaled down for a 2-core CPU; "
                     "not the papers' numbers",
            None, None,
            TrainConfig(epochs=10, batch_size=128, augment="weak", label_smoothing=0.1, ema_decay=0.995,
                        optim=OptimConfig(lr=0.2, weight_decay=5e-4, schedule="onecycle", warmup_epochs=3,
                                          warmup_start=0.1)),
            False)
    if name == "smoke":
        return Profile(
            "smoke", "smoke profile: a few hundred images and a few epochs, for tests only",
            512, 256,
            TrainConfig(epochs=2, batch_size=64, augment="weak",
                        optim=OptimConfig(lr=0.05, weight_decay=5e-4, schedule="constant")),
            True)
    raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")


# A network's own plain recipe where the profile's (tuned for WRN-16-1) does not suit it:
# (profile, model) -> recipe. Measurements behind each: benchmarks/RESULTS.md, "A quick recipe".
MODEL_RECIPES: dict[tuple[str, str], TrainConfig] = {
    # QuickNet, after airbench (Jordan, 2024), restated for a mean loss at batch 256: its lr of
    # 11.5 per 1,024 images with momentum 0.85 (0.375 here), decay 0.0153 per 1,024 images
    # (1.33e-3 of the lr here), BatchNorm shifts at 64x the lr, warm-up from 0.2 of the lr over
    # the first 23 % of the steps, label smoothing 0.2, flip + 2-pixel shifts. Batch 256, not
    # airbench's 1,024: on a CPU a smaller batch costs little speed and its extra steps bought
    # accuracy. 12 epochs take WRN-16-1's 10-epoch wall time on a CPU.
    ("quick", "quicknet"): TrainConfig(
        epochs=12, batch_size=256, augment="light", label_smoothing=0.2, ema_decay=0.99,
        optim=OptimConfig(lr=0.375, momentum=0.85, nesterov=True, weight_decay=1.33e-3, schedule="onecycle",
                          warmup_epochs=0.23 * 12, warmup_start=0.2, norm_bias_lr_scale=64.0)),
}
for _width in ("quicknet-s", "quicknet-m"):
    MODEL_RECIPES[("quick", _width)] = MODEL_RECIPES[("quick", "quicknet")]


def model_recipe(profile: str, model: str) -> TrainConfig:
    """The plain training recipe of `model` in `profile`: its own where it has one, else the
    profile's."""
    return MODEL_RECIPES.get((profile, model.lower()), get_profile(profile).baseline)


Config = TypeVar("Config")


def with_model_recipe(config: Config, profile: str, model: str) -> Config:
    """`config` with every stage that trains with the profile's plain recipe trained with
    `model`'s instead. Stages with a recipe of their own (a paper's fine-tuning, a
    contrastive stage) keep it; `--set` overrides apply afterwards."""
    mine, default = model_recipe(profile, model), get_profile(profile).baseline
    if mine == default:
        return config

    def swap(value: Any) -> Any:
        if isinstance(value, TrainConfig):
            return mine if value == default else value
        if is_dataclass(value) and not isinstance(value, type):
            changed = {f.name: swap(getattr(value, f.name)) for f in fields(value)}
            return replace(value, **{k: v for k, v in changed.items() if v is not getattr(value, k)})
        return value

    return swap(config)
