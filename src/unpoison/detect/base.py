"""The Detector interface: per-sample suspicion scores for an untrusted training set.

Scores first, thresholds second: `scores` is continuous (higher = more likely poisoned);
`flagged` is the detector's own cut, made without knowing the true poison rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..config import apply_overrides, to_plain
from ..context import DefenseContext
from ..profiles import with_model_recipe


@dataclass
class Detection:
    scores: torch.Tensor                 # float (N,), higher = more suspicious
    flagged: torch.Tensor | None = None  # bool (N,)
    model: nn.Module | None = None       # the model the scores came from, for reuse
    stages: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class Detector:
    name = "detector"
    Config: type = object

    def __init__(self, config) -> None:
        self.config = config

    @classmethod
    def for_profile(cls, profile: str, network: str | None = None, **overrides) -> "Detector":
        """As Defense.for_profile: `network` gives plain-training stages that network's recipe."""
        config = cls.Config.for_profile(profile)  # type: ignore[attr-defined]
        if network is not None:
            config = with_model_recipe(config, profile, network)
        return cls(apply_overrides(config, overrides))

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, **to_plain(self.config)}
