"""The Defense interface (the context it runs in is `unpoison.context`).

`Defense.fit(data, ctx)` receives the untrusted training set (images and labels, no
poison mask) and returns a model, optionally per-sample suspicion scores and a flagged
set. Evaluation hooks in the context measure the model from outside; they return
nothing to the defence, so it cannot select on the test set or peek at the mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import apply_overrides, to_plain
# the context lives below detect/ and defenses/; re-exported here for existing imports
from ..context import DefenseContext, StageTimer, channel_stats
from ..data.imageset import ImageSet


@dataclass
class DefenseResult:
    model: nn.Module
    suspicion: torch.Tensor | None = None   # per training sample; higher = more likely poisoned
    flagged: torch.Tensor | None = None     # bool per training sample: what the defence set aside
    trusted: torch.Tensor | None = None     # bool per training sample: what it used as clean with its label
    stages: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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


__all__ = ["Defense", "DefenseContext", "DefenseResult", "StageTimer", "apply_overrides", "channel_stats",
           "to_plain"]
