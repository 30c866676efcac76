"""The context an attack, a detector or a defence runs in.

It sits below `attacks/`, `detect/` and `defenses/` (it imports only data, models, train
and runtime), so a detector and a defence share it without importing each other.
The runner (`run.py`, the user commands) builds one per run: the runtime, the profile,
the seed, where checkpoints go, evaluation hooks that return nothing to the method, and
optionally a model cache for models an identical earlier run already trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import to_plain
from .data.imageset import ImageSet
from .models import Classifier, build_model
from .runtime import Runtime, derive_seed, generator
from .train.supervised import TrainConfig, train_supervised


@dataclass
class DefenseContext:
    runtime: Runtime
    profile: str
    seed: int
    model_name: str
    workdir: Path
    progress: bool = True
    # evaluation hooks, supplied by the runner; both return None to the defence
    on_epoch: Callable[[str, nn.Module, int], None] = lambda stage, model, epoch: None
    on_stage: Callable[[str, nn.Module], None] = lambda stage, model: None
    # trains-or-loads a model shared between runs (e.g. the no-defence model D-BR repairs):
    # `shared_model(key, build)`, usually `ModelCache.shared_model`
    shared_model: Callable[[dict, Callable[[], nn.Module]], nn.Module] | None = None
    log_path: Path | None = None
    # images known to be clean, for the post-training repair baselines only (FT, FP, NAD,
    # ANP, MCR): the runner draws it from unpoisoned training images when the defence asks
    # for one (`needs_clean_reference`); None otherwise
    clean_reference: ImageSet | None = None

    def new_model(self, data: ImageSet, name: str | None = None, role: str = "model") -> Classifier:
        """A freshly initialised model; its initial weights depend only on (seed, role)."""
        mean, std = channel_stats(data)
        torch.manual_seed(derive_seed(self.seed, "init", role))
        return build_model(name or self.model_name, data.num_classes, mean, std)

    def checkpoints(self) -> Path:
        path = self.workdir / "checkpoints"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def epoch_hook(self, stage: str) -> Callable[[nn.Module, int], None]:
        return lambda model, epoch: self.on_epoch(stage, model, epoch)


def channel_stats(data: ImageSet, sample: int = 10000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of (a fixed sample of) the training images, in [0, 1] units."""
    images = data.images[:: max(1, len(data) // sample)].float() / 255
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


class StageTimer:
    """Records {name, seconds, epochs} per stage, the `stages` list of metrics.json."""

    def __init__(self, ctx: DefenseContext) -> None:
        self.ctx = ctx
        self.records: list[dict] = []

    def run(self, name: str, epochs: int | float, fn: Callable[[], Any], model_of: Callable[[Any], nn.Module] | None = None):
        start = time.perf_counter()
        out = fn()
        record = {"name": name, "seconds": round(time.perf_counter() - start, 2), "epochs": epochs}
        self.records.append(record)
        model = model_of(out) if model_of else (out if isinstance(out, nn.Module) else None)
        if model is not None:
            self.ctx.on_stage(name, model)
        return out


def train_standard(data: ImageSet, ctx: DefenseContext, cfg: TrainConfig, name: str = "train",
                   model: str | None = None, fraction: float = 1.0):
    """Plain training with the profile's recipe (shared through ctx.shared_model when given):
    the no-defence model, and the model a detector or D-BR starts from. `model` names an
    architecture other than the run's --model; `fraction` < 1 trains on a seeded random share
    of the set (one pass of it = that fraction of an epoch, e.g. CBD's f_B in `quick`)."""
    def build():
        train = data.head(round(fraction * len(data)), generator(ctx.seed, name, "fraction")) if fraction < 1 else data
        return train_supervised(ctx.new_model(data, model), train, cfg, ctx.runtime, name=name, seed=ctx.seed,
                                checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                                on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)
    if ctx.shared_model is not None and model in (None, ctx.model_name):
        key = {"stage": name, "recipe": to_plain(cfg), **({"fraction": fraction} if fraction < 1 else {})}
        return ctx.shared_model(key, build)
    return build()
