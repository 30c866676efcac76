"""Entropy-based filtering, DLP's "active learning" query (Ying & Wu 2023, Eq. 5).

1. SL: train on the whole untrusted set for a few epochs. The backdoor (one easy
   feature -> one label) is learned long before the main task, so poisoned samples are
   predicted far more confidently than clean ones (the paper's Fig. 1).
2. Score every training image by the Shannon entropy H(x) = -sum_i p_i log2 p_i of the
   SL model's softmax (eval mode, un-augmented images). Suspicion = -H.
3. Split (`entropy_split`): the n*gamma lowest-entropy samples overall are the suspected
   poisoned set D'_p; the highest-entropy samples of each (given) class are the trusted
   clean set D'_c.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..config import to_plain
from ..context import DefenseContext
from ..runtime import Runtime
from ..train.engine import OptimConfig
from ..train.supervised import TrainConfig, predict, train_supervised
from .base import Detection, Detector


def sl_recipe(profile: str) -> TrainConfig:
    """DLP's SL stage per profile.

    paper: E1 = 10 epochs, SGD momentum 0.9, lr 0.01, batch 128 (the paper's defaults);
      augmentation, weight decay and schedule are unspecified: no augmentation (as ABL's
      isolation stage, which DLP builds on), wd 5e-4, constant lr (spec §5.2).
    quick: 2 epochs. The backdoor is learned within the first epoch or two while clean
      accuracy is still low, which is all the filter needs; the saved CPU time goes to
      ASSFT, which decides the final accuracy.
    smoke: 3 epochs of batch 32 at lr 0.02 on a few hundred images, for tests (enough
      steps for a toy backdoor to be learned).
    """
    if profile == "smoke":
        return TrainConfig(epochs=3, batch_size=32, augment="none", optim=OptimConfig(
            lr=0.02, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
    optim = OptimConfig(lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant")
    epochs = {"paper": 10, "quick": 2}[profile]
    return TrainConfig(epochs=epochs, batch_size=128, augment="none", optim=optim)


@dataclass
class EntropyConfig:
    sl: TrainConfig = field(default_factory=lambda: sl_recipe("paper"))
    filter_rate: float = 0.01       # gamma: |D'_p| = n * gamma
    # how D'_c is read from "the last n*gamma samples ... from each class" (spec §5.3):
    # total: n*gamma in total, floor(n*gamma / C) per class (reading (a), the default);
    # per_class: n*gamma from every class (reading (b))
    clean_reading: str = "total"

    @classmethod
    def for_profile(cls, profile: str) -> "EntropyConfig":
        return cls(sl=sl_recipe(profile))


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of softmax(logits), row-wise (Eq. 5)."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1) / math.log(2)


def entropy_split(entropy: torch.Tensor, labels: torch.Tensor, num_classes: int, rate: float,
                  clean_reading: str = "total") -> tuple[torch.Tensor, torch.Tensor]:
    """(suspected poisoned D'_p, trusted clean D'_c) as index tensors.

    D'_p: the n*rate lowest-entropy samples, whatever their label. D'_c: per given label,
    the highest-entropy samples not already in D'_p.
    """
    if clean_reading not in ("total", "per_class"):
        raise ValueError(f"clean_reading must be 'total' or 'per_class', got {clean_reading!r}")
    n = len(entropy)
    n_suspect = max(1, int(round(n * rate)))
    order = torch.argsort(entropy, stable=True)
    suspect = order[:n_suspect]
    per_class = n_suspect if clean_reading == "per_class" else max(1, n_suspect // num_classes)
    available = torch.ones(n, dtype=torch.bool)
    available[suspect] = False
    clean = []
    for c in range(num_classes):
        members = ((labels == c) & available).nonzero().flatten()
        ranked = members[torch.argsort(entropy[members], descending=True, stable=True)]
        clean.append(ranked[:per_class])
    return suspect, torch.cat(clean).sort().values


class EntropyDetector(Detector):
    """Suspicion = -entropy of a briefly trained (SL) model; flagged = D'_p."""

    name = "entropy"
    Config = EntropyConfig

    def train_model(self, data: ImageSet, ctx: DefenseContext, stage: str = "SL") -> nn.Module:
        """The SL model (shared through the run's model cache when the recipe matches)."""
        cfg = self.config.sl

        def build() -> nn.Module:
            return train_supervised(ctx.new_model(data, role="dlp-sl"), data, cfg, ctx.runtime, name=stage,
                                    seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                                    on_epoch_end=ctx.epoch_hook(stage), progress=ctx.progress)

        if ctx.shared_model is not None:
            return ctx.shared_model({"stage": "entropy-sl", "recipe": to_plain(cfg)}, build)
        return build()

    def score(self, model: nn.Module, data: ImageSet, runtime: Runtime) -> torch.Tensor:
        """Per-sample entropy (bits) of the model's prediction on the un-augmented images."""
        return prediction_entropy(predict(model, data.images, runtime))

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:
        model = self.train_model(data, ctx)
        entropy = self.score(model, data, ctx.runtime)
        suspect, clean = entropy_split(entropy, data.labels, data.num_classes, self.config.filter_rate,
                                       self.config.clean_reading)
        flagged = torch.zeros(len(data), dtype=torch.bool)
        flagged[suspect] = True
        return Detection(scores=-entropy, flagged=flagged, model=model,
                         info={"n_suspected": len(suspect), "n_trusted_clean": len(clean),
                               "trusted_clean": clean})
