"""Seed expansion: DLP's entropy filter, carried from its most certain few to the rest.

Why. After a short SL run the lowest-entropy 1 % of a poisoned training set is almost all
poisoned (DLP's filter precision), but further down the entropy ranking the poisoned images
mix with easy clean images the model is just as sure of, so the ranking's recall at 10 %
flagged falls short and moves with the seed and with the step where SL happens to stop
(measured in benchmarks/RESULTS.md, "The `expand` detector").
What the poisoned images share is not how confident the model is but why: the trigger.
In the same model's penultimate features they lie close to each other and to the seeds,
away from clean images, however confident those are.

1. SL and entropy exactly as the entropy detector (same recipe, and the same cached model
   when one exists).
2. Seeds S = the n * gamma lowest-entropy samples (DLP's D'_p).
3. z = penultimate features, centred on the mean over the training set and L2-normalised:
   centring removes the direction every feature shares, so the cosine measures what is
   particular to an image.
4. score_i = the mean cosine similarity of z_i to its k most similar seeds (a seed's own
   similarity to itself is left out). The k nearest seeds, not one centroid, so that
   several triggers or target classes in one set each keep their own neighbourhood.

The scores have no natural cut when the poison rate is unknown, so this detector has no
flagging rule of its own: `scan` flags --flag-fraction (10 % by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.imageset import ImageSet
from ..context import DefenseContext, StageTimer
from ..train.supervised import extract_features
from .base import Detection
from .entropy import EntropyConfig, EntropyDetector


@dataclass
class ExpandConfig(EntropyConfig):
    neighbours: int = 10   # k: seeds each image is compared with


def seed_similarity(features: torch.Tensor, seeds: torch.Tensor, k: int, chunk: int = 8192) -> torch.Tensor:
    """Mean cosine similarity of every row of `features` to its k most similar seed rows
    (centred on the mean of all rows first); a seed is not its own neighbour."""
    if len(seeds) < 2:
        raise ValueError("seed expansion needs at least two seeds")
    z = F.normalize(features.float() - features.float().mean(dim=0, keepdim=True), dim=1)
    anchors = z[seeds]
    k = min(k, len(seeds) - 1)
    position = torch.full((len(z),), -1, dtype=torch.long)
    position[seeds] = torch.arange(len(seeds))
    scores = torch.empty(len(z))
    for start in range(0, len(z), chunk):   # chunks keep memory at chunk x |S| for any n
        rows = torch.arange(start, min(start + chunk, len(z)))
        sims = z[rows] @ anchors.T
        own = position[rows]           # a row's column among the seeds, -1 if not a seed
        is_seed = own >= 0
        sims[is_seed.nonzero().flatten(), own[is_seed]] = -2.0   # below any cosine
        scores[rows] = sims.topk(k, dim=1).values.mean(dim=1)
    return scores


class SeedExpansion(EntropyDetector):
    """Suspicion = feature similarity to the entropy filter's seeds; no flagging rule."""

    name = "expand"
    Config = ExpandConfig

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:
        cfg = self.config
        timer = StageTimer(ctx)
        model = timer.run("SL", cfg.sl.epochs, lambda: self.train_model(data, ctx))
        entropy = self.score(model, data, ctx.runtime)
        n_seeds = max(2, int(round(len(data) * cfg.filter_rate)))
        seeds = torch.argsort(entropy, stable=True)[:n_seeds]
        features = extract_features(model, data.images, ctx.runtime)
        scores = seed_similarity(features, seeds, cfg.neighbours)
        # the features go with the result: a defence that compares images in the probe's
        # feature space later (quarantine's judge) need not extract them again
        return Detection(scores=scores, flagged=None, model=model, stages=timer.records,
                         info={"n_seeds": n_seeds, "neighbours": cfg.neighbours, "features": features})
