"""The Attack interface: poison a training set, trigger test images, describe itself.

A `PoisonedSet` keeps the ground-truth poison mask next to the poisoned data; what a
defence receives is `PoisonedSet.untrusted()`, a plain ImageSet that has no mask, so
no defence can read it by accident (evaluation gets it from the PoisonedSet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.imageset import ImageSet


# the papers' standard poison rate; results at another rate are labelled with theirs
DEFAULT_RATE = 0.1


@dataclass
class PoisonedSet:
    train: ImageSet                 # poisoned images, labels as the attacker left them
    is_poison: torch.Tensor         # bool (N,): ground truth, for evaluation only
    original_labels: torch.Tensor   # labels before relabelling

    def untrusted(self) -> ImageSet:
        """What a defence gets: images and labels, nothing else."""
        return ImageSet(self.train.images, self.train.labels.clone(), list(self.train.classes), self.train.paths)

    def clean_reference(self, fraction: float, g: torch.Generator) -> ImageSet:
        """round(fraction * N) training images drawn at random from those that were not
        poisoned, with their true labels: the small clean set that post-training repair
        methods (FT, FP, NAD, ANP, MCR) assume a defender holds."""
        if not 0 < fraction <= 1:
            raise ValueError(f"the clean reference fraction must lie in (0, 1], got {fraction}")
        clean = (~self.is_poison).nonzero().flatten()
        pick = clean[torch.randperm(len(clean), generator=g)[: int(round(fraction * len(self.is_poison)))]]
        pick = pick.sort().values
        paths = [self.train.paths[i] for i in pick.tolist()] if self.train.paths is not None else None
        return ImageSet(self.train.images[pick], self.original_labels[pick].clone(), list(self.train.classes), paths)

    @property
    def n_poisoned(self) -> int:
        return int(self.is_poison.sum())

    @property
    def poison_index(self) -> torch.Tensor:
        return self.is_poison.nonzero().flatten()


@dataclass
class BackdoorTest:
    images: torch.Tensor        # triggered uint8 test images
    true_labels: torch.Tensor   # for robust accuracy
    target_labels: torch.Tensor  # for attack success rate


class Attack:
    """Base class. Subclasses implement `apply_trigger` (and may override `poison_images`).

    Poison-rate semantics (recorded in metrics.json as n_poisoned):
      dirty-label: floor(rate * N) images drawn from the non-target classes
                   (all-to-all: from all classes), triggered and relabelled;
      clean-label: floor(rate * N) images of the target class (capped at its size),
                   triggered, labels unchanged.
    """

    name = "attack"
    clean_label = False

    def __init__(self, target: int = 0, rate: float = DEFAULT_RATE, mode: str = "all2one") -> None:
        if mode not in ("all2one", "all2all"):
            raise ValueError(f"mode must be all2one or all2all, got {mode!r}")
        if not 0 <= rate <= 1:
            raise ValueError(f"poison rate must lie in [0, 1], got {rate}")
        if self.clean_label and mode == "all2all":
            raise ValueError(f"{self.name} is a clean-label attack: it has no all-to-all form")
        self.target, self.rate, self.mode = target, rate, mode

    # ---------------------------------------------------------------- what subclasses give
    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Add the trigger to a batch of uint8 images (N, 3, H, W); returns uint8."""
        raise NotImplementedError

    def parameters(self) -> dict[str, Any]:
        """The trigger's own parameters, for describe()."""
        return {}

    def prepare(self, train: ImageSet, context: Any) -> None:
        """Build what the attack needs before poisoning (a reference model...). Default: nothing."""

    def poison_images(self, images: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return self.apply_trigger(images, train=True)

    # ---------------------------------------------------------------- shared machinery
    def target_of(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.mode == "all2all":
            return (labels + 1) % num_classes
        return torch.full_like(labels, self.target)

    def select(self, train: ImageSet, g: torch.Generator) -> torch.Tensor:
        """Indices of the training images to poison, per the semantics above."""
        self._check_target(train.num_classes)
        n = int(self.rate * len(train))
        if self.clean_label:
            pool = (train.labels == self.target).nonzero().flatten()
        elif self.mode == "all2all":
            pool = torch.arange(len(train))
        else:
            pool = (train.labels != self.target).nonzero().flatten()
        n = min(n, len(pool))
        return pool[torch.randperm(len(pool), generator=g)[:n]].sort().values

    def poison(self, train: ImageSet, g: torch.Generator) -> PoisonedSet:
        index = self.select(train, g)
        images, labels = train.images.clone(), train.labels.clone()
        if len(index):
            images[index] = self.poison_images(train.images[index], train.labels[index], g)
            if not self.clean_label:
                labels[index] = self.target_of(train.labels[index], train.num_classes)
        is_poison = torch.zeros(len(train), dtype=torch.bool)
        is_poison[index] = True
        return PoisonedSet(ImageSet(images, labels, list(train.classes), train.paths), is_poison, train.labels.clone())

    def backdoor_test(self, test: ImageSet) -> BackdoorTest:
        """Triggered test images: all-to-one uses only images whose true label is not the target."""
        self._check_target(test.num_classes)
        keep = torch.ones(len(test), dtype=torch.bool) if self.mode == "all2all" else test.labels != self.target
        images, labels = test.images[keep], test.labels[keep]
        return BackdoorTest(self.apply_trigger(images, train=False), labels, self.target_of(labels, test.num_classes))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target if self.mode == "all2one" else "y+1 mod C",
                "rate": self.rate, "mode": self.mode, "clean_label": self.clean_label, **self.parameters()}

    def _check_target(self, num_classes: int) -> None:
        if not 0 <= self.target < num_classes:
            raise ValueError(f"target class {self.target} does not exist (dataset has {num_classes} classes)")


class NoAttack(Attack):
    """The clean baseline: nothing is poisoned and there is no trigger."""

    name = "none"

    def __init__(self, target: int = 0, rate: float = 0.0, mode: str = "all2one") -> None:
        super().__init__(target, 0.0, mode)

    def select(self, train: ImageSet, g: torch.Generator) -> torch.Tensor:
        return torch.empty(0, dtype=torch.long)

    def apply_trigger(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        return images

    def describe(self) -> dict[str, Any]:
        return {"name": "none"}


def stamp(images: torch.Tensor, patch: torch.Tensor, top: int, left: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Write a (3, h, w) uint8 patch at (top, left) of every image (where mask is True)."""
    out = images.clone()
    h, w = patch.shape[-2:]
    region = out[:, :, top:top + h, left:left + w]
    if mask is None:
        region.copy_(patch.expand_as(region))
    else:
        region.copy_(torch.where(mask, patch, region))
    return out


def blend(images: torch.Tensor, pattern: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * image + alpha * pattern, floored to uint8 as the reference code does."""
    mixed = (1 - alpha) * images.float() + alpha * pattern.float()
    return mixed.floor().clamp(0, 255).to(torch.uint8)
