"""Quarantine: set the suspects aside, let the model in training judge them, unlearn what it
contradicts, give back what it agrees with. The default of `unpoison train`.

Why this shape (measurements in benchmarks/RESULTS.md, "The default defence"):
- A short plain run learns an easy trigger (a patch, a blend) within an epoch or two, and
  seed expansion (detect/expand.py) then ranks most of that poison in its top 10 %.
  Retraining without those 10 % costs a point of accuracy, and the poisoned images the
  probe misses are enough to plant the backdoor again.
- A model trained on the kept images, part-way through training, predicts the true class of
  a poisoned image (it has not yet learned the trigger from the few it trains on), and the
  given label of most clean images. So in the label group the attack targets, the
  quarantined images are contradicted far more often than that label's kept images; and the
  poisoned images it contradicts, kept or quarantined, it contradicts with near-zero
  probability for their label, more surely than the hard clean images of that label.
  Unlearning them inside the same training run pushes the trigger away from the target as
  fast as the remaining poison pulls it there: the backdoor is not learned.
- The quarantined images of every other label that the model agrees with are clean by the
  same reasoning, and go back into training: the set-aside 10 % costs nothing on clean data.
- An optional recheck looks, after training, for a backdoor learned late (a warp): images
  the final model fits that the early model confidently called something else. A short
  guarded unlearning loop (train/unlearn.py) then removes what they taught. Off by default:
  on CIFAR-10 it fired on clean sets too and cost accuracy.

Stages:
  1. probe       seed expansion on the whole set; its top `quarantine_fraction` are set aside
                 (with `spectral_fraction` > 0, part of that share goes instead to the images
                 furthest along their label's top direction in the probe's features).
  2. train       the profile's recipe on the kept images, with as many optimizer steps per
                 epoch as plain training on the whole set (`steps`). After `verify_at` of the epochs,
                 the EMA model labels every image (the verdict, kept in the checkpoint), and
                 `judge` decides: a label group stands out when its quarantined images are
                 doubted (given less probability for their label than `doubt_quantile` of
                 the label's kept images get) well above that share (a z-test, and at least
                 `group_min_excess` of the set in excess); its known poison (quarantined,
                 contradicted and doubted), the images of the label, kept or quarantined, as
                 close to them in the probe's features as they are to each other
                 (`alike_quantile`; the set-aside ones the verdict agrees with, closer still:
                 `alike_agreed_quantile`), and its kept images contradicted as surely
                 (`kept_quantile` of the known poison's probability), are unlearned from
                 then on, each batch carrying a share of them with a margin loss that pushes
                 their given label a logit below the best other class, and a cross-entropy
                 towards that class (`unlearn_loss`). The agreed quarantined images of other
                 labels rejoin training (`release`), and those of the standing-out label far
                 from its known poison (`release_unlike`). At `second_look_at`, kept images of a standing-out
                 label still contradicted past the first cut are unlearned too.
  3. recheck     (optional) late = fitted by the final model, contradicted by the verdict,
                 and among the `recheck_fraction` closest (final features) to the most
                 confidently contradicted of them.
  4. repair      when late is at least `repair_min_fraction` of the set: the shared
                 unlearning loop, ascent on late, descent on a random share of the trained images.

The defence never sees the poison mask. Settings are typed; `for_profile` gives the measured
defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..context import train_standard
from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..detect.entropy import sl_recipe
from ..detect.expand import ExpandConfig, SeedExpansion
from ..detect.spectral import spectral_scores
from ..profiles import get_profile
from ..train.engine import Engine
from ..train.supervised import DeviceData, TrainConfig, extract_features
from ..train.unlearn import UnlearnConfig, unlearning_loss
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from .dbr import DBRConfig
from .verdict import MIN_REPAIR, LateLook, Verdict, explain, judge, late_learned, repair_late

MIN_PER_CLASS = 10   # below this many images in a class the probe's seeds mean nothing


def spectral_probe_recipe(profile: str) -> TrainConfig:
    """DLP's SL recipe with augmentation, ten times its lr, one epoch more: it learns a rare blend."""
    recipe = sl_recipe(profile)
    return replace(recipe, augment="weak", epochs=recipe.epochs + 1, optim=replace(recipe.optim, lr=recipe.optim.lr * 10))


@dataclass
class QuarantineConfig:
    probe: ExpandConfig = field(default_factory=lambda: ExpandConfig.for_profile("quick"))
    # share of the set the probe sets aside. 0.2, not 0.1: with 0.1 the poison the probe ranks
    # below its top (~400 images on Blended) taught the trigger before the verdict, so nothing stood
    # out (WRN-16-1 Blended seed 0: 99.99 % ASR; QuickNet the same); 0.1 kept ~1 point more CA where
    # it worked, with v6's steps (the kept set's; not re-measured with steps="set")
    # (benchmarks/RESULTS.md, quarantine v5 and v6)
    quarantine_fraction: float = 0.2
    # of that share, the part taken among the rest by the spectral signature (detect/spectral.py)
    # of `spectral_probe`'s features (0: seed expansion alone). At a 1 % rate the probe's most
    # confident images are clean, so expansion has nothing to expand, while the poison still lies
    # along its label's top feature direction; measured, not yet the default (RESULTS.md, v8)
    spectral_fraction: float = 0.0
    spectral_probe: TrainConfig = field(default_factory=lambda: spectral_probe_recipe("quick"))
    train: TrainConfig = field(default_factory=lambda: get_profile("quick").baseline)
    verify_at: float = 0.4               # share of the training epochs before the verdict
    # how many optimizer steps an epoch takes. "kept": one pass over the kept images, so setting
    # aside 20 % also took 20 % of plain training's steps (v6; seed-1 BadNets 78.52 CA). "set": as
    # many steps as plain training on the whole set takes, in full batches drawn from the images
    # trained on (a pass plus a random share of them again), at about plain training's cost
    # (the same cell 81.72; benchmarks/RESULTS.md, quarantine v7)
    steps: Literal["kept", "set"] = "set"
    # a second look: the kept images of a standing-out label that the model still
    # contradicts, past the first look's cut, are unlearned too (None: no second look)
    second_look_at: float | None = 0.7
    unlearn_weight: float = 1.0          # weight of a contradicted image's loss vs a kept image's CE
    # "margin": an unlearned image's given label is pushed a logit below the best other class.
    # "relabel": besides, it is trained as that best other class (the model's reading of its
    # content without the trigger's label), so its pixels still teach the classes; measured
    # +0.9 to +1.2 points of CA over "margin" at the same ASR (benchmarks/RESULTS.md)
    unlearn_loss: Literal["margin", "relabel"] = "relabel"
    # a label group's contradicted images are unlearned when its contradiction rate exceeds the
    # kept images' of that label by this many standard errors (None: every contradicted image)
    group_z: float | None = 3.0
    # what the z-test counts. "doubted": images given less probability for their label than
    # `doubt_quantile` of the kept images of that label get (verdict.doubted). "contradicted":
    # images whose label the model does not predict, against the kept images' error; it missed
    # a patch at 10 % of frogs whose kept frogs the model got 53 % wrong at the verdict
    # (benchmarks/RESULTS.md, quarantine v5)
    group_signal: Literal["doubted", "contradicted"] = "doubted"
    doubt_quantile: float = 0.1
    # ... and, with "doubted", its set-aside images must not be contradicted less often than its
    # kept images (by group_z standard errors): v7 unlearned a clean GTSRB label doubted 26 %
    # against 10 % but contradicted 70 % against 77 %, -4.8 points of CA (RESULTS.md, v8)
    confirm_contradicted: bool = True
    # ... and hold at least this share of the set in contradicted images beyond the kept error
    group_min_excess: float = 0.005
    # in a label group that stood out, kept images of that label which the verdict contradicts
    # at least as confidently as this quantile of the group's contradicted quarantined images
    # (known poison) are unlearned too: poison the probe missed (None: kept images never are)
    kept_quantile: float | None = 0.5
    # ... and images of that label, kept or set aside, as close to the group's known poison, in
    # the probe's features, as this quantile of the known poison's own closeness (leave-one-out):
    # poison the probe ranked just below its cut, and set-aside poison the verdict does not doubt,
    # contradicted or not (None: off)
    alike_quantile: float | None = 0.05
    # ... but of the set-aside images the verdict agrees with, only those at least as close as this
    # quantile of the known poison's closeness; the other agreed alike images are left out of
    # training, neither trained on nor unlearned. An agreed set-aside image is a clean image of
    # the label or poison whose trigger the model has partly learned, and unlearning it is the one
    # step that harms a clean image. v6 used alike_quantile (0.05) for them too: on TrojanNN that
    # unlearned 472 agreed clean airplanes with 471 agreed poison (airplane accuracy 54-60 %,
    # against 85 % for a clean model); at 0.25, 14 clean with 360 poison (benchmarks/RESULTS.md, v7)
    alike_agreed_quantile: float = 0.25
    # after the verdict, quarantined images of labels that did not stand out, which the
    # verdict agrees with, go back to training
    release: bool = True
    # ... and so do the agreed quarantined images of a label that stood out, when they lie
    # farther from its known poison, in the probe's features, than this quantile of the known
    # poison's own closeness (needs alike_quantile; None: they stay out). The share of agreed
    # poison (its trigger learned) that leaks back is about this quantile, so it is small
    release_unlike: float | None = 0.01
    # a late look (None: off): at this share of the epochs, when no label stood out at the verdict,
    # seed expansion runs on the model in training, which may have learned by then a trigger the
    # probe's short run had not (a low poison rate, a warp), and the verdict judges its top
    # `quarantine_fraction` (verdict.LateLook)
    late_look_at: float | None = None
    # off by default: on CIFAR-10 the repair it triggers cost CA on every set and helped only
    # WaNet (benchmarks/RESULTS.md, "The default defence")
    recheck: bool = False
    recheck_seed_fraction: float = 0.01  # seeds of the recheck, as a share of the set
    recheck_fraction: float = 0.10       # how far the recheck expands from its seeds
    repair_min_fraction: float = 0.002   # repair only when late is at least this share of the set
    # D-BR's guarded loop (train/unlearn.py), shorter and with the margin loss
    repair: UnlearnConfig = field(default_factory=lambda: replace(DBRConfig.for_profile("quick").unlearn, epochs=5,
                                                                  loss="margin"))
    trusted_fraction: float = 0.2        # kept images the repair relearns
    # the repaired model is kept only if it fits the trusted images within this much of the
    # model before the repair; otherwise the repair was unlearning clean images and is undone
    repair_tolerance: float = 0.02

    def __post_init__(self) -> None:
        if self.group_signal not in ("doubted", "contradicted"):
            raise ValueError(f"quarantine group_signal must be 'doubted' or 'contradicted', got {self.group_signal!r}")
        if self.steps not in ("kept", "set"):
            raise ValueError(f"quarantine steps must be 'kept' or 'set', got {self.steps!r}")
        if self.unlearn_loss not in ("margin", "relabel"):
            raise ValueError(f"quarantine unlearn_loss must be 'margin' or 'relabel', got {self.unlearn_loss!r}")
        if self.alike_quantile is not None and not 0 <= self.alike_quantile <= 1:
            raise ValueError(f"quarantine alike_quantile must lie in [0, 1], got {self.alike_quantile}")
        if self.second_look_at is not None and not 0 <= self.second_look_at <= 1:
            raise ValueError(f"quarantine second_look_at must lie in [0, 1], got {self.second_look_at}")
        if self.late_look_at is not None and not 0 <= self.late_look_at <= 1:
            raise ValueError(f"quarantine late_look_at must lie in [0, 1], got {self.late_look_at}")
        if self.release_unlike is not None and not 0 <= self.release_unlike <= 1:
            raise ValueError(f"quarantine release_unlike must lie in [0, 1], got {self.release_unlike}")
        if not 0 <= self.spectral_fraction <= self.quarantine_fraction:
            raise ValueError(f"quarantine spectral_fraction must lie in [0, quarantine_fraction], "
                             f"got {self.spectral_fraction}")
        for name in ("quarantine_fraction", "verify_at", "alike_agreed_quantile", "doubt_quantile",
                     "recheck_seed_fraction", "recheck_fraction", "repair_min_fraction", "trusted_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"quarantine {name} must lie in [0, 1], got {value}")

    @property
    def verify_epoch(self) -> int:
        """The epoch before which the verdict is taken (at least one epoch of training)."""
        return max(1, round(self.verify_at * self.train.epochs))

    def _epoch_after_verdict(self, share: float | None) -> int | None:
        """The epoch at `share` of training when it falls after the verdict and before the end."""
        if share is None:
            return None
        epoch = round(share * self.train.epochs)
        return epoch if self.verify_epoch < epoch < self.train.epochs else None

    @property
    def second_look_epoch(self) -> int | None:
        """The epoch before which the second look is taken (after the verdict), or None."""
        return self._epoch_after_verdict(self.second_look_at)

    @property
    def late_look_epoch(self) -> int | None:
        """The epoch before which the late look is taken (after the verdict), or None."""
        return self._epoch_after_verdict(self.late_look_at)

    @classmethod
    def for_profile(cls, profile: str) -> "QuarantineConfig":
        baseline = get_profile(profile).baseline
        repair = replace(DBRConfig.for_profile(profile).unlearn, epochs=5 if profile != "smoke" else 3,
                         loss="margin")
        return cls(probe=ExpandConfig.for_profile(profile), train=baseline, repair=repair,
                   spectral_probe=spectral_probe_recipe(profile))


def train_with_unlearning(model: nn.Module, data: ImageSet, kept: torch.Tensor, quarantined: torch.Tensor,
                          ctx: DefenseContext, cfg: QuarantineConfig, name: str = "train",
                          probe_features: torch.Tensor | None = None) -> tuple[nn.Module, Verdict, dict]:
    """Stage 2: train on the kept images; from the verdict on, train on what `judge` keeps
    and unlearn what it finds in the same batches (`probe_features`: see judge). Returns
    (model, verdict, plan), plan = {"train", "unlearn": masks, "groups": table,
    "images_per_epoch": mean images seen}."""
    recipe = cfg.train
    kept_index = kept.nonzero().flatten()
    # the number of steps is fixed (the schedule is per step), by the kept set or the whole set
    # (cfg.steps); after the verdict the batches grow or shrink a little instead, or, with
    # "set", stay full and draw some images twice
    steps = -(-(len(kept_index) if cfg.steps == "kept" else len(data)) // recipe.batch_size)
    verdict, second, late = Verdict(), Verdict(), LateLook()
    engine = Engine(model, recipe.optim, ctx.runtime, name=name, epochs=recipe.epochs, steps_per_epoch=steps,
                    seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), ema_decay=recipe.ema_decay,
                    extra_state={"verdict": verdict, "second_look": second, "late_look": late}, log_path=ctx.log_path,
                    on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)
    device_data = DeviceData(data, ctx.runtime)
    plan: dict = {}

    def judged() -> dict:
        if "train" not in plan:
            plan["train"], plan["unlearn"], plan["groups"] = judge(verdict, data.labels, quarantined,
                                                                   data.num_classes, cfg, second, probe_features)
            if late.ready:
                plan["train"], plan["unlearn"] = plan["train"] & ~late.drop, plan["unlearn"] | late.unlearn
                plan["late_groups"], plan["late_unlearned"] = late.groups, int(late.unlearn.sum())
        return plan

    def unlearned_loss(logits: torch.Tensor, given: torch.Tensor) -> torch.Tensor:
        loss = unlearning_loss(logits, given, "margin", None)
        if cfg.unlearn_loss == "relabel":
            reading = logits.detach().float().scatter(1, given[:, None], float("-inf")).argmax(1)
            loss = loss + F.cross_entropy(logits, reading, label_smoothing=recipe.label_smoothing)
        return loss

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        if epoch >= cfg.verify_epoch and not verdict.ready:
            verdict.take(engine.eval_model, data, ctx.runtime)
        look = cfg.second_look_epoch
        if (look is not None and epoch >= look and not second.ready
                and any("cut" in group for group in judged()["groups"])):
            second.take(engine.eval_model, data, ctx.runtime)
            plan.clear()
        look = cfg.late_look_epoch
        if (look is not None and epoch >= look and verdict.ready and not late.ready
                and not any(group["unlearned"] for group in judged()["groups"])):
            late.take(engine.eval_model, data, verdict, cfg, ctx.runtime)
            plan.clear()
        if verdict.ready:
            train_index, unlearn_index = judged()["train"].nonzero().flatten(), plan["unlearn"].nonzero().flatten()
        else:
            train_index, unlearn_index = kept_index, torch.empty(0, dtype=torch.long)
        if cfg.steps == "set":   # full batches: a pass over train_index, then a random share again
            extra = max(0, steps * recipe.batch_size - len(train_index))
            train_index = torch.cat([train_index, train_index[torch.randperm(len(train_index), generator=g)[:extra]]])
        batch_size = -(-len(train_index) // steps)   # at most `steps` batches
        train_batches = [train_index[b] for b in batch_indices(len(train_index), batch_size, g)]
        unlearn_shares = torch.tensor_split(unlearn_index[torch.randperm(len(unlearn_index), generator=g)],
                                            len(train_batches))
        batches = list(zip(train_batches, unlearn_shares))

        def loss_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            train_batch, share = batch
            x, y = device_data.batch(torch.cat([train_batch, share]), recipe.augment, g)
            logits = engine.model(x)
            n_train = len(train_batch)
            loss = F.cross_entropy(logits[:n_train], y[:n_train], label_smoothing=recipe.label_smoothing)
            if len(share):
                loss = loss + cfg.unlearn_weight * unlearned_loss(logits[n_train:], y[n_train:]) * len(share) / n_train
            return loss

        engine.run_pass(batches, loss_fn)
        return {"training": int(len(train_index)), "unlearning": int(len(unlearn_index))}

    trained = engine.fit(epoch_fn).eval()
    if not verdict.ready:   # fewer epochs than the verdict needs: judge with the final model
        verdict.take(trained, data, ctx.runtime)
    judged()
    seen = [r["training"] + r["unlearning"] for r in engine.history if "training" in r]
    plan["images_per_epoch"] = round(sum(seen) / len(seen)) if seen else len(kept_index)
    return trained, verdict, plan


def set_aside(expand_scores: torch.Tensor, features: torch.Tensor, data: ImageSet,
              cfg: QuarantineConfig) -> torch.Tensor:
    """Stage 1's quarantine: seed expansion's top, then, among the rest, the images furthest
    along their label's top feature direction (`spectral_fraction` of the set)."""
    n = len(data)
    quarantined = torch.zeros(n, dtype=torch.bool)
    by_expansion = int(round(n * (cfg.quarantine_fraction - cfg.spectral_fraction)))
    quarantined[torch.argsort(expand_scores, descending=True, stable=True)[:by_expansion]] = True
    by_spectrum = int(round(n * cfg.quarantine_fraction)) - by_expansion
    if by_spectrum > 0:
        rest = (~quarantined).nonzero().flatten()
        signature = spectral_scores(features[rest], data.labels[rest], data.num_classes)
        quarantined[rest[torch.argsort(signature, descending=True, stable=True)[:by_spectrum]]] = True
    return quarantined


class Quarantine(Defense):
    name = "quarantine"
    Config = QuarantineConfig

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg = self.config
        timer = StageTimer(ctx)
        cannot = self.cannot_judge(data)
        if cannot:
            model = timer.run("train", cfg.train.epochs, lambda: train_standard(data, ctx, cfg.train))
            return DefenseResult(model, stages=timer.records, notes=[f"{cannot}; trained on every image without a defence"])

        detection = SeedExpansion(cfg.probe).detect(data, ctx)
        timer.records.extend(detection.stages)
        spectral_features = detection.info["features"]
        if cfg.spectral_fraction > 0:
            second = SeedExpansion(replace(cfg.probe, sl=cfg.spectral_probe))
            spectral_features = timer.run("SL2", cfg.spectral_probe.epochs, lambda: extract_features(
                second.train_model(data, ctx, stage="SL2"), data.images, ctx.runtime))
        quarantined = set_aside(detection.scores, spectral_features, data, cfg)
        kept = ~quarantined

        features = detection.info["features"] if cfg.alike_quantile is not None else None
        model, verdict, plan = timer.run(
            "train", cfg.train.epochs,
            lambda: train_with_unlearning(ctx.new_model(data), data, kept, quarantined, ctx, cfg,
                                          probe_features=features),
            model_of=lambda out: out[0])
        unlearned = plan["unlearn"]
        # plain training's cost is estimated from this stage's images per epoch
        timer.records[-1]["images_per_epoch"] = plan["images_per_epoch"]

        late = torch.zeros(len(data), dtype=torch.bool)
        recheck_score = torch.zeros(len(data))
        if cfg.recheck:
            late, recheck_score = timer.run("recheck", 0, lambda: late_learned(model, data, verdict, quarantined, ctx, cfg))
        repaired = bool(late.sum() >= max(MIN_REPAIR, cfg.repair_min_fraction * len(data)))
        undone = False
        if repaired:
            model, undone = timer.run("repair", cfg.repair.epochs, lambda: repair_late(model, data, plan["train"], late,
                                                                                        ctx, cfg),
                                      model_of=lambda out: out[0])
            repaired = not undone

        # ranking for suspects.csv: unlearned quarantine, then late, then the probe's order
        probe_rank = torch.argsort(torch.argsort(detection.scores, stable=True)).float() / max(1, len(data) - 1)
        suspicion = probe_rank + unlearned.float() * 2 + late.float()
        flagged = ~plan["train"] | late
        trusted = plan["train"] & ~late
        notes = explain(cfg, data, quarantined, plan, late, repaired, undone)
        return DefenseResult(model, suspicion=suspicion, flagged=flagged, trusted=trusted, stages=timer.records,
                             notes=notes)

    @staticmethod
    def cannot_judge(data: ImageSet) -> str | None:
        """Why the probe cannot judge this set, in a user's words, or None."""
        counts = torch.bincount(data.labels, minlength=data.num_classes)
        present = int((counts > 0).sum())
        if present < 2:
            return "the set has a single class, so an image's label cannot disagree with what it shows"
        smallest = int(counts[counts > 0].min())
        if smallest < MIN_PER_CLASS:
            return (f"a class has only {smallest} images (the probe needs at least {MIN_PER_CLASS} per class "
                    f"to tell a planted pattern from the class itself)")
        return None
