"""Activation clustering (Chen et al., SafeAI@AAAI 2019).

Algorithm, on a network trained on all the (untrusted) data:
  1. For every training sample, the activations of the last hidden layer (the penultimate
     features, what the head reads).
  2. Per class: reduce them to 10 dimensions with ICA, then k-means with k = 2.
  3. A backdoor splits its target class in two: the clean images and the triggered ones,
     which the network recognises by the trigger. The paper's "relative size" rule flags
     the smaller cluster when it holds at most 35 % of the class; its silhouette score says
     how well two clusters fit the class (high for a poisoned class, low for a clean one).

Per-sample score (the paper flags clusters, it does not rank samples): (1 - r) * s, where r
is the relative size of the sample's cluster within its class and s the class's mean
silhouette. A class that splits cleanly into a small and a large cluster puts its small
cluster on top; a clean class, whose 2-means split is arbitrary, scores low throughout.

Known limit, stated because our default attacks hit it: a 10 % dirty-label attack on
CIFAR-10 makes poisoned images about half of the target class, so the poisoned cluster is
not the smaller one by much and the 35 % rule flags nothing there; the silhouette term
still lifts the whole target class in the ranking. The network is the run's no-defence
model (shared through the model cache, as the paper uses the poisoned model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.imageset import ImageSet
from ..context import DefenseContext, StageTimer, train_standard
from ..profiles import get_profile
from ..runtime import derive_seed
from ..train.supervised import TrainConfig, extract_features
from .base import Detection, Detector, class_members


@dataclass
class ACConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    components: int = 10          # dimensions kept (the paper's choice)
    # ica: FastICA, the paper's; pca: principal components (unwhitened), which keep the
    # dominant direction a trigger cluster lies along (ICA rescales every component alike)
    reduction: str = "ica"
    size_threshold: float = 0.35  # flag the smaller cluster when it holds at most this share of its class
    silhouette_sample: int = 2000  # silhouette on at most this many samples per class (it is O(n^2))

    @classmethod
    def for_profile(cls, profile: str) -> "ACConfig":
        return cls(train=get_profile(profile).baseline)


@dataclass
class ClassClusters:
    assignment: np.ndarray      # 0/1 per sample of the class
    small: int                  # the label of the smaller cluster
    relative_size: float        # the smaller cluster's share of the class
    silhouette: float


def cluster_class(features: np.ndarray, components: int, seed: int, silhouette_sample: int,
                  reduction: str = "ica") -> ClassClusters:
    """ICA (or PCA) to `components` dimensions, then 2-means; the split's sizes and silhouette."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA, FastICA
    from sklearn.metrics import silhouette_score

    n = len(features)
    if n < 4:
        return ClassClusters(np.zeros(n, dtype=int), 1, 0.0, 0.0)
    dims = max(1, min(components, features.shape[1], n - 1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # FastICA's convergence warnings on near-degenerate classes
        if reduction == "ica":
            reducer = FastICA(n_components=dims, random_state=seed, max_iter=400, whiten="unit-variance")
        elif reduction == "pca":
            reducer = PCA(n_components=dims, random_state=seed)
        else:
            raise ValueError(f"AC reduction must be 'ica' or 'pca', got {reduction!r}")
        reduced = reducer.fit_transform(features)
    assignment = KMeans(2, n_init=10, random_state=seed).fit_predict(reduced)
    sizes = np.bincount(assignment, minlength=2)
    if sizes.min() == 0:
        return ClassClusters(assignment, 1, 0.0, 0.0)
    sample = min(n, silhouette_sample)
    silhouette = float(silhouette_score(reduced, assignment, sample_size=sample, random_state=seed))
    small = int(sizes.argmin())
    return ClassClusters(assignment, small, float(sizes[small] / n), silhouette)


def activation_clustering(features: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ACConfig,
                          seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Per-sample scores, the relative-size flags, and a per-class summary."""
    scores = torch.zeros(len(labels), dtype=torch.float64)
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    summary = []
    feats = features.double().numpy()
    for c, index in class_members(labels, num_classes):
        clusters = cluster_class(feats[index.numpy()], cfg.components, derive_seed(seed, "ac", c) % 2**31,
                                 cfg.silhouette_sample, cfg.reduction)
        in_small = torch.from_numpy(clusters.assignment == clusters.small)
        relative = torch.where(in_small, clusters.relative_size, 1 - clusters.relative_size)
        scores[index] = ((1 - relative) * max(clusters.silhouette, 0.0)).double()
        if clusters.relative_size <= cfg.size_threshold and clusters.relative_size > 0:
            flagged[index[in_small]] = True
        summary.append({"class": c, "relative_size": round(clusters.relative_size, 4),
                        "silhouette": round(clusters.silhouette, 4)})
    return scores.float(), flagged, summary


class ActivationClustering(Detector):
    name = "ac"
    Config = ACConfig

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:
        cfg = self.config
        timer = StageTimer(ctx)
        model = timer.run("train", cfg.train.epochs, lambda: train_standard(data, ctx, cfg.train))
        features = timer.run("cluster", 0, lambda: extract_features(model, data.images, ctx.runtime),
                             model_of=lambda f: None)
        scores, flagged, summary = activation_clustering(features, data.labels, data.num_classes, cfg, ctx.seed)
        rule = (f"per class, the smaller 2-means cluster (ICA-{cfg.components}) when it holds at most "
                f"{cfg.size_threshold:.0%} of the class (the paper's relative-size rule)")
        return Detection(scores, flagged, model, timer.records, {"flagging_rule": rule, "classes": summary})
