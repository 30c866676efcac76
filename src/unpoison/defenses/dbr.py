"""D-BR: remove a backdoor from a trained model (Chen, Wu & Wang, NeurIPS 2022; spec §3.8).

    1. SD module (detect/fct.py) on the untrusted set: trusted-clean D_c (lowest 20 % FCT)
       and suspected-poisoned D_p (highest 5 %). It uses its own quick model, never the
       model being repaired (official code and BackdoorBench agree).
    2. For up to 20 epochs, with one SGD optimiser (lr 1e-4, shared momentum) and crop+flip:
         unlearn: one pass over D_p minimising -CE (gradient ascent),
         relearn: one pass over D_c minimising CE.
       Our changes to the official loop, each a setting (`DBRConfig.official()` undoes them):
       - `ascent_bn=running`: the ascent pass normalises with BatchNorm's running statistics.
         In train mode a batch made only of triggered images is normalised by its own
         statistics, which hide much of a trigger the whole batch shares (a blended
         pattern): the ascent then unfits a view the deployed (eval-mode) model never sees.
         Measured on a Blended model with a perfect split: train-mode ascent takes the
         suspected images' loss from 3 to 6 nats while eval mode still sends 100 % of them,
         and of the triggered test images, to the target.
       - `unlearn_loss=complement`: the ascent minimises -log(1 - p_y) instead of -CE, whose
         gradient (~1 - p_y) vanishes on a sample the model fits with p_y -> 1 (the official
         train-mode BN hides that by un-saturating the outputs).
       - `unlearn_bound=chance`: a suspected sample predicted no better than chance (CE past
         ln C) gives no more gradient; unbounded, the running-statistics ascent diverges.
       - `stop_when_unlearned`: the loop ends after the first epoch where no suspected image
         keeps its label and the trusted set is fitted as well as before the repair (both
         training data); the remaining epochs only relearn the trusted 20 % and cost CA.
       - `stall_epochs`: the loop also ends once the suspected set's accuracy has fallen by
         less than `stall_delta` over the last `stall_epochs` epochs, or the trusted set's
         by more (`stop_reason`). What the ascent cannot push down while relearning holds it up is clean images the
         split suspected (all of them on clean data) or a part of the poison the split
         missed; more epochs trade clean accuracy for nothing. Measured (quick, CPU): on
         clean data the suspected set went 0.938 -> 0.936 -> 0.934 over epochs 1-3 while CA
         fell 3.4 points over the 20 epochs; a backdoor the split holds goes from ~1 to
         near zero within a few epochs (Blended 1.00 -> 0.00, BadNets 0.78 -> 0.25 -> 0.14).
    3. The last epoch is the result (the official script picks the epoch with the best test
       CA - ASR, which needs the test labels and the trigger: that is model selection on
       the test set, so we do not).

In `unpoison run` the model to repair is the no-defence model of the same run (trained
once, cached and shared with `--defense none`). `repair()` takes any model, for
`unpoison repair` on a model the user brings.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..detect.fct import SampleSplit, SDConfig, sample_distinguishment
from ..profiles import get_profile
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData
from ..train.unlearn import set_batchnorm_mode, suspected_accuracy
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from .none import train_standard

MODES = ("alternate", "unlearn", "relearn")
ASCENT_BN = ("running", "batch")
TRUSTED_TOLERANCE = 0.01   # stop_when_unlearned: trusted accuracy back within a point
UNLEARN_LOSSES = ("ce", "complement", "margin")
UNLEARN_MARGIN = 1.0   # unlearn_loss=margin: logits by which the given label must trail


@dataclass
class DBRConfig:
    """D-BR. paper = the official code's schedule (up to 20 alternating epochs at lr 1e-4)
    with our changes to the ascent and the stop rule (module doc; `official()` restores the
    official loop). quick: the same, the SD module on the run's model (WRN-16-1).
    smoke: 10 epochs at lr 1e-3, batch 32."""

    sd: SDConfig = field(default_factory=SDConfig)
    epochs: int = 20
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-4, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
    augment: str = "weak"           # RandomCrop(pad 4) + flip for both passes
    # ablation (poster, "effectiveness of BR"): alternate = unlearn + relearn (the method),
    # unlearn = ascent on D_p only, relearn = descent on D_c only
    mode: str = "alternate"
    # BatchNorm in the ascent pass: "running" statistics (BN layers in eval mode; ours) or
    # "batch" statistics (train mode, the official code). See the module doc.
    ascent_bn: str = "running"
    # per-sample CE of the ascent is clipped here: "chance" = ln(num_classes) (ours), a
    # number, or "none" (unbounded, the official code)
    unlearn_bound: str = "chance"
    # what the ascent minimises: "complement" = -log(1 - p_y) (ours), "margin" = a hinge that
    # pushes the given label's logit a margin below the best other class, or "ce" = -CE (the paper)
    unlearn_loss: str = "complement"
    # end the loop once no suspected image (eval mode, no augmentation) keeps its label
    # and the trusted set is fitted as before the repair: more relearning on the
    # trusted 20 % only costs CA (ours; the official loop runs all `epochs`)
    stop_when_unlearned: bool = True
    # end the loop once, over the last `stall_epochs` epochs, the suspected set's accuracy has
    # fallen by less than `stall_delta` (unlearning has stalled on what relearning keeps
    # fitted) or the trusted set's by more (the ascent is eroding clean features); ours,
    # 0 = never (the official loop)
    stall_epochs: int = 2
    stall_delta: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"D-BR mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.ascent_bn not in ASCENT_BN:
            raise ValueError(f"D-BR ascent_bn must be one of {', '.join(ASCENT_BN)}, got {self.ascent_bn!r}")
        if self.unlearn_loss not in UNLEARN_LOSSES:
            raise ValueError(f"D-BR unlearn_loss must be one of {', '.join(UNLEARN_LOSSES)}, got {self.unlearn_loss!r}")
        if self.stall_epochs < 0 or not 0 <= self.stall_delta <= 1:
            raise ValueError(f"D-BR stall_epochs must be >= 0 and stall_delta in [0, 1], got "
                             f"{self.stall_epochs} and {self.stall_delta}")
        self.bound(10)  # fail now, not after the SD module, on a bad value

    def bound(self, num_classes: int) -> float | None:
        """The clip on each suspected sample's CE during ascent, or None for none."""
        value = str(self.unlearn_bound).strip().lower()
        if value == "none":
            return None
        if value == "chance":
            return math.log(num_classes)
        try:
            bound = float(value)
        except ValueError:
            raise ValueError(f"D-BR unlearn_bound must be 'chance', 'none' or a number, got {self.unlearn_bound!r}") from None
        if not bound > 0:
            raise ValueError(f"D-BR unlearn_bound must be positive, got {bound}")
        return bound

    @classmethod
    def official(cls, profile: str = "paper") -> "DBRConfig":
        """The official code's BR loop: train-mode BN, unbounded ascent on -CE, all epochs."""
        return replace(cls.for_profile(profile), ascent_bn="batch", unlearn_bound="none", unlearn_loss="ce",
                       stop_when_unlearned=False, stall_epochs=0)

    @property
    def measures_progress(self) -> bool:
        """Whether the loop measures the suspected and trusted sets after each epoch."""
        return self.mode != "relearn" and (self.stop_when_unlearned or self.stall_epochs > 0)

    @classmethod
    def for_profile(cls, profile: str) -> "DBRConfig":
        sd = SDConfig.for_profile(profile)
        if profile in ("paper", "quick"):
            return cls(sd=sd)
        if profile == "smoke":
            return cls(sd=sd, epochs=10, batch_size=32,
                       optim=OptimConfig(lr=1e-3, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
        raise ValueError(f"unknown profile {profile!r}")


def unlearning_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, bound: float | None) -> torch.Tensor:
    """The loss the ascent pass minimises, averaged over the batch.

    "ce": -CE (the paper), whose gradient (~1 - p_y) vanishes on samples the model fits
    with p_y -> 1. "complement": CE towards "not the given label", -log(1 - p_y), whose
    gradient stays O(1) there but fades as p_y falls (~p_y), so a sample near chance can
    keep its label as the argmax. For both, samples whose CE is past `bound` give no
    gradient. "margin": max(0, z_y - max_k!=y z_k + 1), O(1) for every sample the model
    still gives its label (or nearly), zero once the label trails the best other class by a
    logit; it bounds itself, so `bound` is not used."""
    logits = logits.float()
    if kind == "margin":
        given = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
        return F.relu(given - others + UNLEARN_MARGIN).mean()
    ce = F.cross_entropy(logits, labels, reduction="none")
    if kind == "ce":
        per_sample = -ce if bound is None else -ce.clamp(max=bound)
    else:
        # -log(1 - exp(-ce)), written with expm1 so that ce -> 0 stays finite
        per_sample = -torch.log(-torch.expm1(-ce.clamp(min=1e-12)))
        if bound is not None:
            per_sample = per_sample * (ce < bound)
    return per_sample.mean()


def stop_reason(suspected_accs: list[float], trusted_accs: list[float], trusted_before: float,
                cfg: DBRConfig) -> str | None:
    """Why the loop should end after this epoch, or None (training data only).

    `suspected_accs`: the suspected set's accuracy before the repair and after each epoch so
    far; `trusted_accs`: the trusted set's after each epoch so far.
    "unlearned": no suspected image keeps its label and the trusted set is fitted as before
    the repair (less a point). Not "at chance": while the loop ran, the share of triggered
    test images sent to the target tracked the share of suspected images keeping their
    label (BadNets: 7.2 % and 7.9 %), so a suspected set at chance leaves an ASR near 10 %.
    "stalled": the suspected set's accuracy fell by less than `stall_delta` over the last
    `stall_epochs` epochs: relearning holds up what is left. "eroding": the trusted set's
    accuracy fell by more than `stall_delta` over those epochs (the loop's own epochs; the
    first ascent costs some that relearning gives back): the ascent is now unlearning what
    the clean images share, so the suspected set is mostly clean images."""
    now = suspected_accs[-1]
    if now <= 0.0:
        unlearned = cfg.stop_when_unlearned and trusted_accs[-1] >= trusted_before - TRUSTED_TOLERANCE
        return "unlearned" if unlearned else None
    if 0 < cfg.stall_epochs < len(suspected_accs) and suspected_accs[-1 - cfg.stall_epochs] - now < cfg.stall_delta:
        return "stalled"
    if 0 < cfg.stall_epochs < len(trusted_accs) and trusted_accs[-1 - cfg.stall_epochs] - trusted_accs[-1] > cfg.stall_delta:
        return "eroding"
    return None


def unlearn_relearn_epoch(suspected: DeviceData, trusted: DeviceData, cfg: DBRConfig, num_classes: int,
                          trusted_before: float = 0.0, suspected_before: float = 1.0):
    """An epoch_fn: one ascent pass over the suspected set, then one descent pass over the
    trusted set, on the same optimiser (the official loop). With the stop rules on it
    measures both sets after the epoch and ends the loop as `stop_reason` says; the
    accuracies before the repair are `suspected_before` and `trusted_before`, and earlier
    epochs' come from the engine's history (kept in its checkpoint, so resume is exact)."""
    bound = cfg.bound(num_classes)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        def ascent(index: torch.Tensor) -> torch.Tensor:
            x, y = suspected.batch(index, cfg.augment, g)
            logits = engine.model(x)
            suspected_ce.append(float(F.cross_entropy(logits.detach().float(), y)))
            return unlearning_loss(logits, y, cfg.unlearn_loss, bound)

        def descent(index: torch.Tensor) -> torch.Tensor:
            x, y = trusted.batch(index, cfg.augment, g)
            return F.cross_entropy(engine.model(x), y)

        out = {}
        suspected_ce: list[float] = []
        if cfg.mode in ("alternate", "unlearn"):
            set_batchnorm_mode(engine.model, cfg.ascent_bn == "batch")
            engine.run_pass(batch_indices(len(suspected), cfg.batch_size, g), ascent, "unlearn")
            set_batchnorm_mode(engine.model, True)
            out["unlearn_loss"] = sum(suspected_ce) / len(suspected_ce)   # the suspected set's CE
        if cfg.mode in ("alternate", "relearn"):
            out["relearn_loss"] = engine.run_pass(batch_indices(len(trusted), cfg.batch_size, g), descent, "relearn")
        if cfg.measures_progress:
            engine.model.eval()
            out["suspected_acc"] = round(suspected_accuracy(engine.model, suspected), 4)
            out["trusted_acc"] = round(suspected_accuracy(engine.model, trusted), 4)
            engine.model.train()
            accs = [suspected_before] + [h["suspected_acc"] for h in engine.history] + [out["suspected_acc"]]
            trusted_accs = [h["trusted_acc"] for h in engine.history] + [out["trusted_acc"]]
            reason = stop_reason(accs, trusted_accs, trusted_before, cfg)
            out["stopped"] = reason is not None
            if reason:
                out["stop_reason"] = reason
        return out

    return epoch_fn


def unlearn_relearn(model: nn.Module, data: ImageSet, split: SampleSplit, ctx: DefenseContext,
                    cfg: DBRConfig, name: str = "dbr") -> nn.Module:
    """The BR module: alternate unlearning of D_p and relearning of D_c; returns the last epoch."""
    suspected = DeviceData(data.subset(split.poisoned), ctx.runtime)
    trusted = DeviceData(data.subset(split.clean), ctx.runtime)
    steps = (-(-len(suspected) // cfg.batch_size) * (cfg.mode != "relearn")
             + -(-len(trusted) // cfg.batch_size) * (cfg.mode != "unlearn"))
    engine = Engine(model, cfg.optim, ctx.runtime, name=name, epochs=cfg.epochs, steps_per_epoch=steps,
                    seed=ctx.seed, checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                    on_epoch_end=ctx.epoch_hook(name), progress=ctx.progress)
    # the input model's own fit of both sets: the ascent may cost some of the trusted set's,
    # and the loop does not stop as unlearned before relearning has given it back
    trusted_before = suspected_before = 0.0
    if cfg.measures_progress:
        trusted_before = suspected_accuracy(model, trusted)
        suspected_before = round(suspected_accuracy(model, suspected), 4)
    epoch_fn = unlearn_relearn_epoch(suspected, trusted, cfg, data.num_classes, trusted_before, suspected_before)
    return engine.fit(epoch_fn).eval()


def repair(model: nn.Module, data: ImageSet, ctx: DefenseContext, config: DBRConfig | None = None,
           timer: StageTimer | None = None) -> DefenseResult:
    """Remove a backdoor from `model` using the untrusted set it was trained on (or one like it).

    The model is copied, never modified in place. The result carries the repaired model,
    the FCT scores as suspicion and the suspected-poisoned split as flagged."""
    config = config or DBRConfig.for_profile(ctx.profile)
    timer = timer or StageTimer(ctx)
    split = sample_distinguishment(data, ctx, config.sd, timer)
    # a copy with gradients on: a trained model may come back frozen (an EMA copy)
    model = copy.deepcopy(model).requires_grad_(True)
    repaired = timer.run("unlearn_relearn", config.epochs, lambda: unlearn_relearn(model, data, split, ctx, config))
    notes = [f"SD split: {int(split.clean.sum())} trusted clean, {int(split.poisoned.sum())} suspected poisoned, "
             f"{int(split.uncertain.sum())} uncertain; D-BR mode {config.mode}, ascent BN {config.ascent_bn}, "
             f"ascent loss {config.unlearn_loss}"
             f"{'' if config.unlearn_loss == 'margin' else ' clipped at ' + str(config.unlearn_bound)}; "
             f"{_stop_rules(config)}; "
             f"last epoch returned"]
    return DefenseResult(repaired, suspicion=split.scores, flagged=split.poisoned, trusted=split.clean,
                         stages=timer.records, notes=notes)


def _stop_rules(config: DBRConfig) -> str:
    rules = (["stops once no suspected image keeps its label"] if config.stop_when_unlearned else []) + (
        [f"stops once in {config.stall_epochs} epochs its accuracy falls < {config.stall_delta} "
         f"or the trusted set's > {config.stall_delta}"]
        if config.stall_epochs else [])
    return ", ".join(rules) if config.measures_progress else "all epochs"


class DBR(Defense):
    name = "dbr"
    Config = DBRConfig
    main_epochs = "epochs"

    def fit(self, data: ImageSet, ctx: DefenseContext) -> DefenseResult:
        timer = StageTimer(ctx)
        # the backdoored model to repair: the run's no-defence model, shared with --defense none
        baseline = get_profile(ctx.profile).baseline
        backdoored = timer.run("train", baseline.epochs, lambda: train_standard(data, ctx, baseline))
        return repair(backdoored, data, ctx, self.config, timer)
