"""What the post-training repair baselines (FT, FP, NAD, ANP, MCR) share.

Their papers assume a defender who holds a trained, possibly backdoored model and a small
set of images known to be clean (5 % of the training set in NAD, ANP and BackdoorBench).
Here the model is the run's no-defence model (trained once, cached, shared with
`--defense none` and D-BR) and the clean set is `ctx.clean_reference`: `unpoison run` draws
it from the training images that were *not* poisoned; a folder user passes `--clean DIR`.

By construction a method never sees anything else: `PostTrainingRepair.fit` uses the
untrusted set only to obtain the backdoored model, then calls the method's
`repair(model, clean, ctx)`, whose arguments are the model, the clean reference and the
context (whose evaluation hooks return nothing). No method picks a threshold, a pruning
ratio or a checkpoint with test labels or the trigger; each states its rule.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..profiles import model_recipe
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from ..context import train_standard

# the share of the training set `unpoison run` draws as the clean reference (NAD, ANP, BackdoorBench)
CLEAN_FRACTION = 0.05


class CleanReferenceError(ValueError):
    """The clean reference is missing, too small, or lacks a class."""


def check_clean_reference(clean: ImageSet | None, num_classes: int, minimum: int, method: str) -> ImageSet:
    """The clean reference a method may use, or a clear error naming what it needs."""
    if clean is None:
        raise CleanReferenceError(
            f"{method} repairs a model with a small set of images known to be clean and none was given: "
            f"`unpoison run` draws {CLEAN_FRACTION:.0%} of the unpoisoned training images by default "
            f"(--clean-fraction), a folder user passes --clean DIR (at least {minimum} images, every class)")
    if clean.num_classes != num_classes:
        raise CleanReferenceError(f"the clean reference has {clean.num_classes} classes, the model {num_classes}")
    if len(clean) < minimum:
        raise CleanReferenceError(f"{method} needs a clean reference of at least {minimum} images; "
                                  f"got {len(clean)}")
    counts = clean.class_counts()
    missing = [clean.classes[c] for c in range(num_classes) if int(counts[c]) == 0]
    if missing:
        raise CleanReferenceError(f"{method} needs at least one clean image of every class; the clean reference "
                                  f"has none of {', '.join(map(repr, missing))} (minimum: {minimum} images, "
                                  "every class)")
    return clean


def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy with gradients on (a cached or EMA model comes back frozen); the input is never modified."""
    return copy.deepcopy(model).requires_grad_(True).train()


class PostTrainingRepair(Defense):
    """Base of the repair baselines: backdoored model + clean reference -> repaired model.

    A subclass sets `name`, `Config` (with a `min_clean` field) and implements
    `repair_stages(model, clean, ctx, timer)`."""

    main_epochs = "epochs"
    needs_clean_reference = True

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        clean = check_clean_reference(ctx.clean_reference, data.num_classes, self.config.min_clean, self.name.upper())
        timer = StageTimer(ctx)
        baseline = model_recipe(ctx.profile, ctx.model_name)
        # the only use of the untrusted set: the backdoored model, shared with --defense none
        backdoored = timer.run("train", baseline.epochs, lambda: train_standard(data, ctx, baseline))
        result = self.repair(backdoored, clean, ctx, timer)
        result.notes.insert(0, f"{self.name}: repaired the no-defence model with a clean reference of "
                               f"{len(clean)} images (its only clean knowledge)")
        return result

    def repair(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext,
               timer: StageTimer | None = None) -> DefenseResult:
        """Repair `model` with the clean reference; the stages are timed on `timer`, or on a
        timer of their own when the caller keeps none (`unpoison repair`)."""
        return self.repair_stages(model, clean, ctx, timer or StageTimer(ctx))

    def repair_stages(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext,
                      timer: StageTimer) -> DefenseResult:  # pragma: no cover
        raise NotImplementedError


@torch.no_grad()
def clean_accuracy(model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> float:
    """Accuracy on the clean reference (eval mode, no augmentation): the only accuracy a
    repair method may select on."""
    from ..train.supervised import predict

    return float((predict(model, clean.images, ctx.runtime).argmax(1) == clean.labels).float().mean())
