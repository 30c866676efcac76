"""STRIP (Gao et al., ACSAC 2019), in its training-set form.

STRIP tests an input by superimposing it on other images: a clean image's prediction
scatters (high entropy), while a triggered one keeps predicting the target class because
the trigger survives the overlay (low entropy). Here it scans the training set:
  1. the network: the run's no-defence model (the poisoned model the paper inspects);
  2. for every training image x, N overlays x + x_j (the official code's
     cv2.addWeighted(x, 1, x_j, 1, 0): a sum saturating at 255), x_j drawn at random from
     the training set itself (a training-set scan has no held-out clean images; the few
     poisoned x_j add noise, not signal);
  3. H(x) = mean over the N overlays of the prediction's entropy -sum p log2 p.
Suspicion = -H. Flagging: the paper sets the threshold at a 1 % false-rejection rate of a
normal distribution fitted to clean entropies; the scan fits it to the training set's
entropies robustly (median and 1.4826 * MAD, which the poisoned minority barely moves) and
flags below its 1 % quantile. N = 100 in the paper; `quick` uses 10 (50,000 x N forward
passes on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.imageset import ImageSet
from ..context import DefenseContext, StageTimer, train_standard
from ..profiles import get_profile
from ..runtime import generator
from ..train.supervised import TrainConfig, predict
from .base import Detection, Detector

Z_ONE_PERCENT = 2.3263   # the standard normal's 99 % quantile


@dataclass
class STRIPConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    overlays: int = 100          # N
    # add: x + x_j saturating at 255 (the official code); average: (x + x_j) / 2
    blend: str = "add"
    false_rejection: float = 0.01  # only 0.01 is tabulated (Z_ONE_PERCENT)
    chunk: int = 1000            # images overlaid at once (memory: chunk x N images)

    @classmethod
    def for_profile(cls, profile: str) -> "STRIPConfig":
        overlays = {"paper": 100, "quick": 10, "smoke": 8}[profile]
        return cls(train=get_profile(profile).baseline, overlays=overlays)


def superimpose(images: torch.Tensor, others: torch.Tensor, blend: str = "add") -> torch.Tensor:
    """x + x_j saturating at 255, or their average (uint8 in, uint8 out)."""
    if blend == "add":
        return (images.int() + others.int()).clamp(max=255).to(torch.uint8)
    if blend == "average":
        return ((images.int() + others.int()) // 2).to(torch.uint8)
    raise ValueError(f"STRIP blend must be 'add' or 'average', got {blend!r}")


@torch.no_grad()
def strip_entropy(model, images: torch.Tensor, pool: torch.Tensor, overlays: int, ctx: DefenseContext,
                  g: torch.Generator, chunk: int = 1000, blend: str = "add") -> torch.Tensor:
    """Mean prediction entropy (bits) of each image over `overlays` superimpositions."""
    entropies = []
    for start in range(0, len(images), chunk):
        batch = images[start:start + chunk]
        partners = pool[torch.randint(len(pool), (overlays * len(batch),), generator=g)]
        blended = superimpose(batch.repeat(overlays, 1, 1, 1), partners, blend)
        probs = torch.softmax(predict(model, blended, ctx.runtime), 1)
        entropy = -(probs * torch.log2(probs.clamp(min=1e-12))).sum(1)
        entropies.append(entropy.view(overlays, len(batch)).mean(0))
    return torch.cat(entropies)


def robust_threshold(entropy: torch.Tensor) -> float:
    """The 1 % quantile of a normal fitted by median and MAD."""
    median = entropy.median()
    spread = 1.4826 * (entropy - median).abs().median()
    return float(median - Z_ONE_PERCENT * spread)


class STRIP(Detector):
    name = "strip"
    Config = STRIPConfig

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:
        cfg = self.config
        if cfg.false_rejection != 0.01:
            raise ValueError("STRIP false_rejection: only the paper's 0.01 is supported")
        timer = StageTimer(ctx)
        model = timer.run("train", cfg.train.epochs, lambda: train_standard(data, ctx, cfg.train))
        entropy = timer.run("overlay", 0, lambda: strip_entropy(model, data.images, data.images, cfg.overlays, ctx,
                                                                  generator(ctx.seed, "strip"), cfg.chunk, cfg.blend),
                            model_of=lambda e: None)
        threshold = robust_threshold(entropy)
        flagged = entropy < threshold
        rule = (f"entropy below {threshold:.4f} bits, the 1 % quantile of a normal fitted to the training set's "
                f"entropies by median and MAD ({cfg.overlays} overlays per image)")
        return Detection(-entropy, flagged, model, timer.records, {"flagging_rule": rule})
