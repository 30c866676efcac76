"""DLP: the decoupled learning process (Ying & Wu, Cybersecurity 6:9, 2023; spec §5).

    SL     train on the whole untrusted set for E1 epochs: the backdoor is learned,
           the main task only partly.
    filter entropy of the SL model's predictions; the n*gamma lowest-entropy samples are
           the suspected poisoned set D'_p, the highest-entropy samples of each class the
           trusted clean set D'_c (detect/entropy.py).
    AU     active unlearning: gradient ascent on the cross-entropy of D'_p (Eq. 6).
    ASSFT  active semi-supervised fine-tuning: FixMatch with D'_c labelled and every
           other image unlabelled (Eq. 7; train/fixmatch.py), from the AU weights.

`order` runs the paper's ablations (Fig. 4): sl-assft (no AU), sl-au (no ASSFT) and
sl-assft-au (AU last). Choices the paper leaves open are fields of DLPConfig; their
defaults and the reasons for them are in `for_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.imageset import ImageSet
from ..detect.entropy import EntropyConfig, EntropyDetector, entropy_split
from ..train.engine import OptimConfig
from ..train.fixmatch import FixMatchConfig, train_fixmatch
from ..train.unlearn import UnlearnConfig, unlearn
from .base import Defense, DefenseContext, DefenseResult, StageTimer

ORDERS = ("sl-au-assft", "sl-assft", "sl-au", "sl-assft-au")


def au_recipe(profile: str, reading: str = "bounded") -> UnlearnConfig:
    """AU: E2 = 20 epochs of gradient ascent, SGD momentum 0.9, lr 0.01, batch 128 (paper).

    reading 'as_written': exactly that, on the mean CE. On CIFAR-10 it does not stop at
      forgetting the trigger: it drives clean accuracy to chance (CA 0.10 after 20 epochs
      on our machine), which the paper's "CAs are only slightly affected" contradicts.
    reading 'bounded' (default): the same optimiser and epochs, but each suspected
      sample's CE is clipped at ln(C) + 1 nats (C classes) - the loss of a prediction
      already worse than uniform on its given label - so the ascent stops by itself once
      the suspected samples are no longer fitted, instead of tearing down the features
      everything else needs; BatchNorm statistics stay frozen, so 500 triggered images
      do not replace the statistics of the whole training set. The stopping rule looks
      at the suspected set only (never at test data).
    """
    cfg = UnlearnConfig(epochs=20, batch_size=128 if profile != "smoke" else 64,
                        optim=OptimConfig(lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4,
                                          schedule="constant"))
    if reading == "as_written":
        return cfg
    if reading != "bounded":
        raise ValueError(f"AU reading must be 'bounded' or 'as_written', got {reading!r}")
    cfg.loss_bound = -1.0   # resolved to ln(C) + 1 at fit time, when C is known
    cfg.freeze_bn = True
    return cfg


def assft_recipe(profile: str) -> FixMatchConfig:
    """ASSFT = FixMatch (tau 0.95, lambda_u 1, EMA 0.999, Nesterov, cosine 7/16 decay).

    paper: B = 64, mu = 7 (FixMatch's defaults; DLP names neither), lr 0.01 (DLP's stated
      default), K = 2^16 steps as 64 epochs of 1024 steps (FixMatch's 2^20 would be
      months here; the paper gives no length).
    quick: sized so SL + AU + ASSFT fits in 2x the quick clean-training time on a 2-core
      CPU: B = 64, mu = 3 (each step costs (1 + 2 mu) B images of training; mu = 3 keeps
      more labelled gradient per unit of compute for the 500 labelled images), 12 epochs
      of one pass over the unlabelled set each, lr 0.03 (FixMatch's own, since the run is
      ~100x shorter than FixMatch's and starts from trained weights).
    smoke: a handful of steps, for tests.
    """
    if profile == "paper":
        cfg = FixMatchConfig(epochs=64, steps_per_epoch=1024, batch_size=64, mu=7)
        cfg.optim.lr = 0.01
        return cfg
    if profile == "quick":
        return FixMatchConfig(epochs=12, steps_per_epoch=None, batch_size=64, mu=3)
    if profile == "smoke":
        return FixMatchConfig(epochs=2, steps_per_epoch=4, batch_size=16, mu=2, ema_decay=0.9)
    raise ValueError(f"unknown profile {profile!r}")


@dataclass
class DLPConfig:
    filter: EntropyConfig = field(default_factory=EntropyConfig)
    au: UnlearnConfig = field(default_factory=lambda: au_recipe("paper"))
    assft: FixMatchConfig = field(default_factory=lambda: assft_recipe("paper"))
    order: str = "sl-au-assft"

    @classmethod
    def for_profile(cls, profile: str) -> "DLPConfig":
        """paper: the paper's defaults (SL 10 epochs, gamma 1 %, AU 20 epochs at lr 0.01,
        D'_c read as n*gamma in total, 50 per class on CIFAR-10) with FixMatch's own
        hyper-parameters where the paper is silent. quick: SL 2 epochs and a shorter ASSFT
        (see sl_recipe / assft_recipe); AU and the filter are as in the paper."""
        return cls(filter=EntropyConfig.for_profile(profile), au=au_recipe(profile), assft=assft_recipe(profile))


class DLP(Defense):
    name = "dlp"
    Config = DLPConfig
    main_epochs = "assft.epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg = self.config
        if cfg.order not in ORDERS:
            raise ValueError(f"DLP order must be one of {', '.join(ORDERS)}, got {cfg.order!r}")
        timer = StageTimer(ctx)
        detector = EntropyDetector(cfg.filter)

        model = timer.run("SL", cfg.filter.sl.epochs, lambda: detector.train_model(data, ctx, "SL"))
        entropy = timer.run("filter", 0, lambda: detector.score(model, data, ctx.runtime))
        suspected, trusted = entropy_split(entropy, data.labels, data.num_classes, cfg.filter.filter_rate,
                                           cfg.filter.clean_reading)

        for stage in cfg.order.split("-")[1:]:
            if stage == "au":
                model = timer.run("AU", cfg.au.epochs, lambda: self._unlearn(model, data.subset(suspected), ctx))
            else:
                model = timer.run("ASSFT", cfg.assft.epochs, lambda: self._fine_tune(model, data, trusted, ctx))

        flagged = torch.zeros(len(data), dtype=torch.bool)
        flagged[suspected] = True
        notes = [f"filter: |D'_p| = {len(suspected)} suspected, |D'_c| = {len(trusted)} trusted-clean "
                 f"(gamma {cfg.filter.filter_rate}, {cfg.filter.clean_reading} reading)"]
        return DefenseResult(model, suspicion=-entropy, flagged=flagged, stages=timer.records, notes=notes)

    def _unlearn(self, model, suspected: ImageSet, ctx: DefenseContext):
        au = self.config.au
        if au.loss_bound is not None and au.loss_bound < 0:   # "ln(C) + 1", see au_recipe
            from dataclasses import replace
            import math

            au = replace(au, loss_bound=math.log(suspected.num_classes) + 1.0)
        return unlearn(model, suspected, au, ctx.runtime, name="AU", seed=ctx.seed, checkpoint_dir=ctx.checkpoints(),
                       log_path=ctx.log_path, on_epoch_end=ctx.epoch_hook("AU"), progress=ctx.progress)

    def _fine_tune(self, model, data: ImageSet, trusted: torch.Tensor, ctx: DefenseContext):
        unlabelled = torch.ones(len(data), dtype=torch.bool)
        unlabelled[trusted] = False
        # only the images of D'_ur cross into FixMatch: their labels never do
        return train_fixmatch(model, data.subset(trusted), data.images[unlabelled], self.config.assft, ctx.runtime,
                              name="ASSFT", seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                              on_epoch_end=ctx.epoch_hook("ASSFT"), progress=ctx.progress)
