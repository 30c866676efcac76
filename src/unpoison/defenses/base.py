"""The Defense interface, and the context a defence runs in.

`Defense.fit(data, ctx)` receives the untrusted training set (images and labels, no
poison mask) and returns a model, optionally per-sample suspicion scores and a flagged
set. Evaluation hooks in the context measure the model from outside; they return
nothing to the defence, so it cannot select on the test set or peek at the mask.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..models import Classifier, build_model
from ..runtime import Runtime, derive_seed


@dataclass
class DefenseResult:
    model: nn.Module
    suspicion: torch.Tensor | None = None   # per training sample; higher = more likely poisoned
    flagged: torch.Tensor | None = None     # bool per training sample: what the defence set aside
    trusted: torch.Tensor | None = None     # bool per training sample: what it used as clean with its label
    stages: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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
    # trains-or-loads a model shared between runs (e.g. the no-defence model D-BR repairs)
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


class Defense:
    """Base class: a defence has a name, a typed config (dataclass), and fit()."""

    name = "defense"
    Config: type = object
    main_epochs = "train.epochs"   # the setting `--epochs` changes
    needs_clean_reference = False  # True: the runner supplies ctx.clean_reference

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def for_profile(cls, profile: str, **overrides: Any) -> "Defense":
        config = cls.Config.for_profile(profile)  # type: ignore[attr-defined]
        return cls(apply_overrides(config, overrides))

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **to_plain(self.config)}


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """Set (possibly nested, dotted) config fields: {'epochs': 5, 'train.optim.lr': 0.01}."""
    for key, value in overrides.items():
        if value is None:
            continue
        head, _, rest = key.partition(".")
        names = {f.name for f in fields(config)}
        if head not in names:
            raise ValueError(f"{type(config).__name__} has no setting {head!r}; it has {', '.join(sorted(names))}")
        if rest:
            config = replace(config, **{head: apply_overrides(getattr(config, head), {rest: value})})
        else:
            current = getattr(config, head)
            if isinstance(current, bool) and isinstance(value, str):
                value = value.lower() in ("1", "true", "yes", "on")
            elif isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
                value = type(current)(value)
            config = replace(config, **{head: value})
    return config


def to_plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {k: to_plain(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
