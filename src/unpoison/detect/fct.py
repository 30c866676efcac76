"""FCT and the sample-distinguishment (SD) module (Chen, Wu & Wang, NeurIPS 2022; spec §3.2-3.5).

Observation: a backdoored model's features of a poisoned image depend on a small trigger
that a rotation or shift destroys or moves, so they change far more under a transformation
than the features of a clean image.

    1. Train a quick model on the untrusted set without augmentation: 2 epochs of CE
       (the backdoor is fitted first), then 10 epochs of the centroid-separation loss
       ("L_intra") on the features, with the same optimiser state.
    2. FCT(x) = 1/d ||phi(x) - phi(tau(x))||^2, tau = random rotation (+-180 deg) then random
       translation (+-20 %); one draw per image (or the mean of `draws` draws).
    3. Split by rank: the lowest alpha_c = 20 % are trusted clean, the highest alpha_p = 5 %
       suspected poisoned, the rest uncertain.

The official code computes FCT twice with independent draws (once for thresholds, once
to split); one pass split by rank is what those thresholds intend (spec §3.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import augment
from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..config import to_plain
from ..context import DefenseContext, StageTimer
from ..runtime import generator
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData, extract_features
from .base import Detection, Detector


@dataclass
class SDConfig:
    """The SD module. Paper profile = the official code (ResNet-18 with stem max-pool).

    quick: the run's model (WRN-16-1 by default; ResNet-18 is ~10x slower on this CPU), the
    paper's 2 CE epochs and 4 (not 10) centroid-separation epochs on the full set, since each
    epoch of 50k images is minutes on a CPU (benchmarks/RESULTS.md, engine throughput). smoke: 3 + 1 epochs of 32-image batches at lr 0.05.
    """

    model: str | None = None          # None: the run's --model; paper: "resnet18-maxpool"
    ce_epochs: int = 2                # CE without augmentation: the backdoor is learnt first
    intra_epochs: int = 10            # centroid-separation ("L_intra") epochs, same optimiser
    batch_size: int = 128
    # SGD 0.01, momentum 0.9, wd 5e-4. The official cosine has T_max = 100 epochs and is
    # stepped per epoch, so over these 12 epochs it only falls from 0.0100 to 0.0090:
    # we keep it constant (a <= 10 % difference in lr).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
    transform: str = "rotate_translate"   # ablations: flip, crop, blur, erase (augment.TRANSFORMS)
    draws: int = 1                        # FCT averaged over this many draws of the transform
    clean_fraction: float = 0.20          # alpha_c
    poison_fraction: float = 0.05         # alpha_p
    # Not in the paper, off by default. scorer: what ranks the samples, "fct" (the paper) or
    # "expand" (detect/expand.py; FCT ranks a noise blend backwards, expand does not).
    # clean_per_class: D_c = the lowest alpha_c of every labelled class rather than of the
    # whole set, so the trusted set holds every class (expand's lowest 20 % of a Blended
    # CIFAR-10 set has 52-59 images of ship, automobile and airplane and 2,567 dogs).
    scorer: str = "fct"
    clean_per_class: bool = False

    def __post_init__(self) -> None:
        # checked here so a typo fails before the quick model is trained, not after
        if self.transform not in augment.TRANSFORMS:
            raise ValueError(f"unknown FCT transform {self.transform!r}; known: {', '.join(augment.TRANSFORMS)}")
        if not (0 <= self.clean_fraction and 0 <= self.poison_fraction and self.clean_fraction + self.poison_fraction <= 1):
            raise ValueError("clean_fraction and poison_fraction must be >= 0 and sum to at most 1")
        if self.draws < 1:
            raise ValueError("draws must be >= 1")
        if self.scorer not in ("fct", "expand"):
            raise ValueError(f"SD scorer must be 'fct' or 'expand', got {self.scorer!r}")

    @classmethod
    def for_profile(cls, profile: str) -> "SDConfig":
        if profile == "paper":
            return cls(model="resnet18-maxpool")
        if profile == "quick":
            return cls(intra_epochs=4)
        if profile == "smoke":
            # a few hundred images: more, smaller steps at a higher lr, so the backdoor is learnt
            return cls(ce_epochs=3, intra_epochs=1, batch_size=32, optim=OptimConfig(
                lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
        raise ValueError(f"unknown profile {profile!r}")


@dataclass
class SampleSplit:
    """The SD module's output: FCT scores and the three subsets (bool masks over the set)."""

    scores: torch.Tensor      # FCT per sample, higher = more sensitive = more likely poisoned
    clean: torch.Tensor       # D_c: trusted clean (lowest scores)
    poisoned: torch.Tensor    # D_p: suspected poisoned (highest scores)
    model: nn.Module | None = None

    @property
    def uncertain(self) -> torch.Tensor:
        return ~(self.clean | self.poisoned)


def centroid_separation_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The official "L_intra": mean cosine similarity between the class centroids of a batch
    (by the given labels), over all K^2 entries with a zero diagonal. Minimising it pushes
    class centroids apart, and with them poisoned samples from the target class's clean ones."""
    classes, inverse = labels.unique(return_inverse=True)
    k = len(classes)
    sums = torch.zeros(k, features.shape[1], device=features.device, dtype=features.dtype)
    sums.index_add_(0, inverse, features)
    counts = torch.bincount(inverse, minlength=k).to(features.dtype)
    centroids = F.normalize(sums / counts[:, None], dim=1)
    similarity = centroids @ centroids.t()
    similarity = similarity - torch.diag_embed(torch.diagonal(similarity))
    return similarity.sum() / k ** 2


def train_sd_model(data: ImageSet, ctx: DefenseContext, cfg: SDConfig, name: str = "sd") -> nn.Module:
    """Step 1 + 2: CE epochs then centroid-separation epochs, one optimiser, no augmentation."""
    model = ctx.new_model(data, cfg.model, role=name)
    device_data = DeviceData(data, ctx.runtime)
    epochs = cfg.ce_epochs + cfg.intra_epochs
    engine = Engine(model, cfg.optim, ctx.runtime, name=name, epochs=epochs,
                    steps_per_epoch=-(-len(data) // cfg.batch_size), seed=ctx.seed,
                    checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                    on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        phase = "ce" if epoch < cfg.ce_epochs else "intra"

        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = device_data.batch(index, "none", g)
            if phase == "ce":
                return F.cross_entropy(engine.model(x), y)
            return centroid_separation_loss(engine.model.features(x).float(), y)

        engine.run_pass(batch_indices(len(device_data), cfg.batch_size, g), loss_fn, phase)
        return {"phase": phase}

    return engine.fit(epoch_fn).eval()


def fct_scores(model: nn.Module, data: ImageSet, ctx: DefenseContext, transform: str = "rotate_translate",
               draws: int = 1, name: str = "fct") -> torch.Tensor:
    """FCT(x) = mean squared difference between phi(x) and phi(tau(x)), per sample."""
    if transform not in augment.TRANSFORMS:
        raise ValueError(f"unknown FCT transform {transform!r}; known: {', '.join(augment.TRANSFORMS)}")
    tau = augment.TRANSFORMS[transform]
    reference = extract_features(model, data.images, ctx.runtime)
    total = torch.zeros(len(data))
    for draw in range(draws):
        g = generator(ctx.seed, name, transform, draw)
        # batches are visited in order, so one generator gives each image its own fixed draw
        moved = extract_features(model, data.images, ctx.runtime, transform=lambda x: tau(x, g))
        total += (reference - moved).pow(2).mean(dim=1)
    return total / draws


def split_by_rank(scores: torch.Tensor, clean_fraction: float, poison_fraction: float,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lowest floor(alpha_c N) -> clean, highest floor(alpha_p N) -> poisoned (ties by index).

    With `labels`, clean is the lowest floor(alpha_c N_y) of each class y instead (never a
    sample already in poisoned)."""
    n = len(scores)
    n_clean, n_poison = int(clean_fraction * n), int(poison_fraction * n)
    if n_clean + n_poison > n:
        raise ValueError(f"clean ({clean_fraction}) and poisoned ({poison_fraction}) fractions exceed 1")
    order = torch.sort(scores.double(), stable=True).indices
    clean = torch.zeros(n, dtype=torch.bool)
    poisoned = torch.zeros(n, dtype=torch.bool)
    if n_poison:
        poisoned[order[n - n_poison:]] = True
    if labels is None:
        clean[order[:n_clean]] = True
        return clean, poisoned
    ranked_labels = labels[order]
    for y in labels.unique():
        members = order[(ranked_labels == y) & ~poisoned[order]]
        clean[members[:int(clean_fraction * int((labels == y).sum()))]] = True
    return clean, poisoned


def sample_distinguishment(data: ImageSet, ctx: DefenseContext, cfg: SDConfig,
                           timer: StageTimer | None = None) -> SampleSplit:
    """The SD module: train (or reuse) the quick model, score every sample, split by rank.

    The quick model is shared between runs through ctx.shared_model when it has the run's
    architecture, so D-ST, D-BR and the FCT detector on the same poisoned set train it once."""
    timer = timer or StageTimer(ctx)
    labels = data.labels if cfg.clean_per_class else None
    if cfg.scorer == "expand":
        from .expand import SeedExpansion

        found = SeedExpansion.for_profile(ctx.profile).detect(data, ctx)
        timer.records.extend(found.stages)
        clean, poisoned = split_by_rank(found.scores, cfg.clean_fraction, cfg.poison_fraction, labels)
        return SampleSplit(found.scores, clean, poisoned, found.model)

    def build() -> nn.Module:
        return train_sd_model(data, ctx, cfg)

    shareable = ctx.shared_model is not None and cfg.model in (None, ctx.model_name)
    recipe = {k: v for k, v in to_plain(cfg).items() if k in ("model", "ce_epochs", "intra_epochs", "batch_size", "optim")}
    train = (lambda: ctx.shared_model({"stage": "sd", "recipe": recipe}, build)) if shareable else build
    model = timer.run("sd_model", cfg.ce_epochs + cfg.intra_epochs, train)
    scores = timer.run("fct", cfg.draws, lambda: fct_scores(model, data, ctx, cfg.transform, cfg.draws))
    clean, poisoned = split_by_rank(scores, cfg.clean_fraction, cfg.poison_fraction, labels)
    return SampleSplit(scores, clean, poisoned, model)


class FCT(Detector):
    """FCT as a standalone detector: scores = FCT, flagged = the SD module's poisoned split."""

    name = "fct"
    Config = SDConfig

    def detect(self, data: ImageSet, ctx: DefenseContext) -> Detection:
        timer = StageTimer(ctx)
        split = sample_distinguishment(data, ctx, self.config, timer)
        return Detection(split.scores, split.poisoned, split.model, timer.records,
                         {"n_clean": int(split.clean.sum()), "n_poisoned": int(split.poisoned.sum()),
                          "n_uncertain": int(split.uncertain.sum())})
