"""The Detector interface: per-sample suspicion scores for an untrusted training set.

Scores first, thresholds second: `scores` is continuous (higher = more likely poisoned);
`flagged` is the detector's own cut, made without knowing the true poison rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

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


def class_members(labels: torch.Tensor, num_classes: int, min_size: int = 1) -> Iterator[tuple[int, torch.Tensor]]:
    """(class, indices of its samples) for every class of at least `min_size` samples: the
    per-class detectors measure each class in its own units and pass over those too small."""
    for c in range(num_classes):
        index = (labels == c).nonzero().flatten()
        if len(index) >= min_size:
            yield c, index


def flag_top_of_each_class(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, fraction: float,
                           min_class_size: int = 1) -> torch.Tensor:
    """Flags the int(fraction * class size) highest scores of every class of at least
    `min_class_size` samples: a cut that assumes a poisoned share, the same for every class."""
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    for _, index in class_members(labels, num_classes, min_class_size):
        k = int(fraction * len(index))
        flagged[index[scores[index].argsort(descending=True)[:k]]] = True
    return flagged


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
