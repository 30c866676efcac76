"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018): poisoned samples leave a trace
in the top singular direction of their class's learned representations.

Algorithm (the paper's Algorithm 1), per class y, on a network trained on all the data:
  1. R = penultimate features of every training sample labelled y.
  2. Centre them: R_hat = R - mean(R).
  3. v = top right singular vector of R_hat.
  4. score_i = (R_hat_i . v)^2, the squared projection on v.
  5. Flag the 1.5 * eps * |y| highest scores of the class, eps an upper bound on the
     fraction of poisoned samples in a class (the paper removes them and retrains).

Ranking across classes: raw squared projections are in each class's own units, so the
score reported here is the squared projection divided by its class mean (= the top
eigenvalue of the class covariance). Within a class the order is exactly the paper's;
across classes a score reads "times the typical spread along the class's top direction".

Flagging rule, stated because it does not adapt: 1.5 * eps of *every* class with at least
`min_class_size` samples is flagged, poisoned or not (eps = `upper_bound`, default 0.1, an
assumption, not the true rate). Known limit: when poison makes up close to half of the
target class (a 10 % dirty-label attack on CIFAR-10 puts ~47 % of the target class under
the trigger), the class mean sits between the two clusters and both get large scores;
the paper evaluated 5-10 % of one class. FCT or entropy are the better detectors there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..data.imageset import ImageSet
from ..context import DefenseContext, StageTimer, train_standard
from ..profiles import get_profile
from ..train.supervised import TrainConfig, extract_features
from .base import Detection, Detector, class_members, flag_top_of_each_class


@dataclass
class SpectralConfig:
    # the network whose features are read: the profile's plain recipe, for fewer epochs
    # in `quick` (a backdoor is fitted within the first epochs; the paper trains fully)
    train: TrainConfig = field(default_factory=TrainConfig)
    upper_bound: float = 0.1     # eps: assumed upper bound on the poisoned fraction of a class
    removal_factor: float = 1.5  # the paper flags 1.5 * eps of each class
    min_class_size: int = 2      # a class of one sample has no direction to project on

    @classmethod
    def for_profile(cls, profile: str) -> "SpectralConfig":
        baseline = get_profile(profile).baseline
        if profile == "quick":
            baseline = replace(baseline, epochs=6, optim=replace(baseline.optim, warmup_epochs=1))
        return cls(train=baseline)


def spectral_scores(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    min_class_size: int = 2) -> torch.Tensor:
    """Per-sample squared projection on the class's top singular direction, divided by
    the class mean of those projections (0 for classes too small to have a direction)."""
    scores = torch.zeros(len(labels), dtype=torch.float64)
    feats = features.double()
    for _, index in class_members(labels, num_classes, min_class_size):
        centred = feats[index] - feats[index].mean(dim=0, keepdim=True)
        # top right singular vector of the centred matrix (a d x d problem, d = 64 for WRN-16-1)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        projection = (centred @ vh[0]) ** 2
        scores[index] = projection / projection.mean().clamp(min=1e-12)
    return scores.float()


def spectral_flags(scores: torch.Tensor, labels: torch.Tensor, num_classes: int, upper_bound: float,
                   removal_factor: float = 1.5, min_class_size: int = 2) -> torch.Tensor:
    """The paper's cut: the removal_factor * upper_bound highest scores of every class."""
    return flag_top_of_each_class(scores, labels, num_classes, removal_factor * upper_bound, min_class_size)


class SpectralSignature(Detector):
    name = "spectral"
    Config = SpectralConfig

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:
        cfg = self.config
        timer = StageTimer(ctx)
        model = timer.run("spectral-train", cfg.train.epochs,
                          lambda: train_standard(data, ctx, cfg.train, name="spectral-train"))
        features = extract_features(model, data.images, ctx.runtime)
        scores = spectral_scores(features, data.labels, data.num_classes, cfg.min_class_size)
        flagged = spectral_flags(scores, data.labels, data.num_classes, cfg.upper_bound, cfg.removal_factor,
                                 cfg.min_class_size)
        rule = (f"per class, the {cfg.removal_factor:g} x {cfg.upper_bound:g} highest scores "
                f"(assumed upper bound on the poisoned fraction of a class, not the true rate)")
        return Detection(scores, flagged, model, timer.records, {"flagging_rule": rule})
