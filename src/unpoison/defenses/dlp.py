"""DLP: the decoupled learning process (Ying & Wu, Cybersecurity 6:9, 2023; spec §5).

    SL     train on the whole untrusted set for E1 epochs: the backdoor is learned,
           the main task only partly.
    filter entropy of the SL model's predictions; the n*gamma lowest-entropy samples are
           the suspected poisoned set D'_p, the highest-entropy samples of each class the
           trusted clean set D'_c (detect/entropy.py).
    AU     active unlearning: gradient ascent on the cross-entropy of D'_p (Eq. 6); in
           `quick`, train/unlearn.py's guarded loop with D'_c as its trusted set (au_recipe).
    ASSFT  active semi-supervised fine-tuning: FixMatch with D'_c labelled and every
           other image unlabelled (Eq. 7; train/fixmatch.py), from the AU weights.

`order` runs the paper's ablations (Fig. 4): sl-assft (no AU), sl-au (no ASSFT) and
sl-assft-au (AU last). Choices the paper leaves open are fields of DLPConfig; their
defaults and the reasons for them are in `for_profile`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..data.imageset import ImageSet
from ..detect.entropy import EntropyConfig, EntropyDetector, entropy_split
from ..train.engine import OptimConfig
from ..train.fixmatch import FixMatchConfig, train_fixmatch
from ..train.unlearn import UnlearnConfig, describe, unlearn
from .base import Defense, DefenseContext, DefenseResult, StageTimer

ORDERS = ("sl-au-assft", "sl-assft", "sl-au", "sl-assft-au")


def au_recipe(profile: str) -> UnlearnConfig:
    """AU per profile (train/unlearn.py's block).

    paper: as the paper writes it: E2 = 20 epochs of gradient ascent on the mean CE of D'_p,
      SGD momentum 0.9, lr 0.01, batch 128; no augmentation and wd 5e-4 (unspecified), no
      early stop. On CIFAR-10 it does not stop at forgetting the trigger (measured on our
      BadNets SL model: ASR 1.00 -> 0 in two epochs while CA falls 49 -> 11 %), where the
      paper reports CA "only slightly affected".
    quick (ours): the guarded loop D-BR measured: each ascent pass on D'_p is followed by a
      descent pass on D'_c (the trusted set DLP already has at AU time), BatchNorm on its
      running statistics, the complement loss -log(1 - p_y) clipped at chance (an O(1)
      gradient on the saturated suspected images, where -CE has none), lr 1e-3, and the stage
      ends once no image of D'_p keeps its label with D'_c fitted as before, or once
      unlearning stalls or erodes D'_c (training data only). Measured on BadNets (quick, seed
      0, benchmarks/RESULTS.md "DLP's active unlearning"): SL 48.99 / 99.96; this AU 46.34 /
      3.32; the margin loss at lr 1e-2 39.04 / 0.69 and at 1e-3 42.47 / 0.91; the paper's
      ascent 10.00 / 0.00. The paper's ascent is `--set au.mode=unlearn --set
      au.batchnorm=train --set au.loss=ce --set au.bound=none --set au.stop=never --set
      au.stall_epochs=0 --set au.optim.lr=0.01`.
    smoke: quick with batch 64.
    """
    as_written = UnlearnConfig.plain_ascent(
        epochs=20, batch_size=128, augment="none",
        optim=OptimConfig(lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
    if profile == "paper":
        return as_written
    guarded = replace(as_written, mode="alternate", batchnorm="running", loss="complement", bound=1.0,
                      stop="unlearned", stall_epochs=2, optim=replace(as_written.optim, lr=1e-3))
    if profile == "quick":
        return guarded
    if profile == "smoke":
        return replace(guarded, batch_size=64)
    raise ValueError(f"unknown profile {profile!r}")


def assft_recipe(profile: str) -> FixMatchConfig:
    """ASSFT = FixMatch (tau 0.95, lambda_u 1, EMA 0.999, Nesterov, cosine 7/16 decay).

    paper: B = 64, mu = 7 (FixMatch's defaults; DLP names neither), lr 0.01 (DLP's stated
      default), K = 2^16 steps as 64 epochs of 1024 steps (FixMatch's 2^20 would be
      months here; the paper gives no length).
    quick: sized so SL + AU + ASSFT fits in 2x the quick clean training (10 epochs) on a
      2-core CPU: each step costs (1 + 2 mu) B images of training, so B = 64, mu = 3
      (448 images, 2.3x the optimiser steps of mu = 7 for the same compute) and 7 epochs
      of one pass over the unlabelled set (~1,800 steps, ~810k images: ~16 epochs'
      worth of supervised training, with SL's 2 epochs ~18), lr 0.03 (FixMatch's own),
      EMA 0.99 (a run this short has no room for 0.999's long memory).
    smoke: a handful of steps, for tests.
    """
    if profile == "paper":
        cfg = FixMatchConfig(epochs=64, steps_per_epoch=1024, batch_size=64, mu=7)
        cfg.optim.lr = 0.01
        return cfg
    if profile == "quick":
        # EMA 0.99: at 0.999 the ~1,800-step run would end with 0.999^1800 = 16 % of the
        # averaged weights still those of the AU model it started from
        return FixMatchConfig(epochs=7, steps_per_epoch=None, batch_size=64, mu=3, ema_decay=0.99)
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
        (see sl_recipe / assft_recipe); D'_c read per class (n*gamma =
        500 labelled images from every class, reading (b) of spec §5.3): 50 labels per class
        is what FixMatch needs a million steps to exploit, and the quick ASSFT has ~1,800.
        AU: the paper's ascent in `paper`, the guarded loop in `quick` (au_recipe);
        `--set filter.clean_reading=total` is the paper profile's reading (a)."""
        cfg = cls(filter=EntropyConfig.for_profile(profile), au=au_recipe(profile), assft=assft_recipe(profile))
        if profile == "quick":
            cfg.filter.clean_reading = "per_class"
        return cfg


class DLP(Defense):
    name = "dlp"
    Config = DLPConfig
    main_epochs = "assft.epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg, timer = self.config, StageTimer(ctx)
        if cfg.order not in ORDERS:
            raise ValueError(f"DLP order must be one of {', '.join(ORDERS)}, got {cfg.order!r}")
        detector = EntropyDetector(cfg.filter)

        model = timer.run("SL", cfg.filter.sl.epochs, lambda: detector.train_model(data, ctx, "SL"))
        entropy = timer.run("filter", 0, lambda: detector.score(model, data, ctx.runtime))
        suspected, trusted = entropy_split(entropy, data.labels, data.num_classes, cfg.filter.filter_rate,
                                           cfg.filter.clean_reading)

        for stage in cfg.order.split("-")[1:]:
            if stage == "au":
                model = timer.run("AU", cfg.au.epochs, lambda: self._unlearn(model, data, suspected, trusted, ctx))
            else:
                model = timer.run("ASSFT", cfg.assft.epochs, lambda: self._fine_tune(model, data, trusted, ctx))

        flagged = torch.zeros(len(data), dtype=torch.bool)
        flagged[suspected] = True
        trusted_mask = torch.zeros(len(data), dtype=torch.bool)
        trusted_mask[trusted] = True
        notes = [f"filter: |D'_p| = {len(suspected)} suspected, |D'_c| = {len(trusted)} trusted-clean "
                 f"(gamma {cfg.filter.filter_rate}, {cfg.filter.clean_reading} reading)"]
        if "au" in cfg.order:
            notes.append(f"AU: {describe(cfg.au)}")
        return DefenseResult(model, suspicion=-entropy, flagged=flagged, trusted=trusted_mask, stages=timer.records,
                             notes=notes)

    def _unlearn(self, model, data: ImageSet, suspected: torch.Tensor, trusted: torch.Tensor, ctx: DefenseContext):
        return unlearn(model, data.subset(suspected), self.config.au, ctx.runtime, trusted=data.subset(trusted),
                       name="AU", seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                       on_epoch_end=ctx.epoch_hook("AU"), progress=ctx.progress)

    def _fine_tune(self, model, data: ImageSet, trusted: torch.Tensor, ctx: DefenseContext):
        unlabelled = torch.ones(len(data), dtype=torch.bool)
        unlabelled[trusted] = False
        # only the images of D'_ur cross into FixMatch: their labels never do
        return train_fixmatch(model, data.subset(trusted), data.images[unlabelled], self.config.assft, ctx.runtime,
                              name="ASSFT", seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                              on_epoch_end=ctx.epoch_hook("ASSFT"), progress=ctx.progress)
