"""Unlearning a backdoor: ascent on a suspected-poisoned set, optionally alternating with
descent on a trusted set. One block for DLP's active unlearning (AU), D-BR's
unlearn/relearn loop and ABL's unlearning stage; each method picks its own defaults.

    for each epoch (one optimiser, shared momentum):
        ascent   one pass over the suspected set minimising an *unlearning loss*
                 (the papers: -CE), with BatchNorm in train mode or on its running statistics
        descent  (mode "alternate") one pass over the trusted set minimising CE
        stop?    measured on training data only (eval mode, un-augmented images)

Why each setting exists (measured; benchmarks/RESULTS.md, D-BR and DLP sections):

- `batchnorm="running"`: in train mode a batch made only of triggered images is normalised
  by its own statistics, which hide a trigger the whole batch shares (a blended pattern):
  the ascent then unfits a view the deployed, eval-mode model never sees.
- `loss`: -CE's gradient is ~(1 - p_y), nothing on a sample the model fits with p_y -> 1,
  so with running statistics the ascent first does nothing, momentum builds, and it then
  diverges. "complement" = -log(1 - p_y) keeps an O(1) gradient on saturated samples but
  fades near chance; "margin" = max(0, z_y - max_{k!=y} z_k + margin) is O(1) for every
  sample that still keeps its label (or nearly) and zero past the margin (self-bounded).
- `bound` (in units of ln C, the CE of a prediction at chance): a sample whose CE is past
  it gives no more gradient; unbounded -CE runs away (CIFAR-10 accuracy to 10 %).
- `mode="alternate"`: a pure ascent takes clean accuracy down with the backdoor; each
  ascent pass followed by a descent pass on trusted data keeps the clean task fitted.
- `stop`: "chance" ends the stage once the suspected set is predicted no better than
  chance (1/C; DLP's reading of "unlearned"); "unlearned" once no suspected image keeps its
  label (a set at chance left ~10 % ASR on BadNets, since triggered test images follow the
  share of suspected images that keep their label). With a trusted set, both also wait
  until its accuracy is back within `trusted_tolerance` of where it was before.
  `stall_epochs` > 0 adds two more: "stalled" (the suspected set's accuracy fell by less
  than `stall_delta` over the last `stall_epochs` epochs: what is left is clean images or
  poison relearning holds up; not while the set is at chance and the trusted set is still
  being refitted) and "eroding" (the trusted set's fell by more: the ascent
  is unlearning what clean images share).

`UnlearnConfig.plain_ascent()` is the papers' unguarded ascent; `UnlearnConfig.guarded()`
the alternating loop with every guard on. `unlearn()` runs either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..runtime import Runtime
from .engine import Engine, OptimConfig
from .supervised import DeviceData, predict

Mode = Literal["alternate", "unlearn", "relearn"]
BatchNormMode = Literal["train", "running"]
UnlearnLoss = Literal["ce", "complement", "margin"]
StopRule = Literal["never", "chance", "unlearned"]


@dataclass
class UnlearnConfig:
    """One unlearning stage. The defaults are the papers' plain ascent (DLP's AU as written)."""

    epochs: int = 20
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="constant"))
    augment: str = "none"            # both passes
    # alternate = ascent on the suspected set then descent on the trusted set, every epoch;
    # unlearn = ascent only; relearn = descent only (D-BR's ablations)
    mode: Mode = "unlearn"
    batchnorm: BatchNormMode = "train"   # during the ascent pass (the descent is always train mode)
    loss: UnlearnLoss = "ce"
    # per-sample CE past bound * ln(C) gives no gradient (ce, complement); None = unbounded
    bound: float | None = None
    margin: float = 1.0              # loss "margin": logits by which the given label must trail
    stop: StopRule = "never"
    stall_epochs: int = 0            # 0 = no stalled/eroding rules
    stall_delta: float = 0.01
    trusted_tolerance: float = 0.01  # stop rules wait for the trusted set to be back within this

    def __post_init__(self) -> None:
        # `--set` hands strings; check here so a typo fails before any training
        if isinstance(self.bound, str):
            self.bound = None if self.bound.strip().lower() in ("none", "") else float(self.bound)
        for name, kind in (("mode", Mode), ("batchnorm", BatchNormMode), ("loss", UnlearnLoss), ("stop", StopRule)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"unlearning {name} must be one of {', '.join(get_args(kind))}, "
                                 f"got {getattr(self, name)!r}")
        if self.bound is not None and not self.bound > 0:
            raise ValueError(f"unlearning bound must be positive (in units of ln C) or None, got {self.bound}")
        if self.stall_epochs < 0 or not 0 <= self.stall_delta <= 1:
            raise ValueError(f"unlearning stall_epochs must be >= 0 and stall_delta in [0, 1], got "
                             f"{self.stall_epochs} and {self.stall_delta}")

    @classmethod
    def plain_ascent(cls, **changes) -> "UnlearnConfig":
        """Unguarded: gradient ascent on -CE, BatchNorm in train mode, every epoch (the papers)."""
        return cls(**changes)

    @classmethod
    def guarded(cls, **changes) -> "UnlearnConfig":
        """The alternating loop with every guard on: running BN statistics, the margin loss,
        stop once no suspected image keeps its label, or once unlearning stalls or erodes."""
        return cls(**{"mode": "alternate", "batchnorm": "running", "loss": "margin", "stop": "unlearned",
                      "stall_epochs": 2, **changes})

    @property
    def measures_progress(self) -> bool:
        """Whether the loop measures the suspected (and trusted) set after each epoch."""
        return self.mode != "relearn" and (self.stop != "never" or self.stall_epochs > 0)

    def bound_nats(self, num_classes: int) -> float | None:
        return None if self.bound is None else self.bound * math.log(num_classes)


def set_batchnorm_mode(model: nn.Module, train: bool) -> None:
    """Switch only the BatchNorm layers: eval = normalise with the running statistics (and
    leave them untouched), train = normalise with the batch's own and update them."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(train)


@torch.no_grad()
def suspected_accuracy(model: nn.Module, data: DeviceData) -> float:
    """Accuracy against the given labels, eval mode, un-augmented images."""
    return float((predict(model, data.images, data.runtime).argmax(1) == data.labels.cpu()).float().mean())


def unlearning_loss(logits: torch.Tensor, labels: torch.Tensor, kind: UnlearnLoss, bound: float | None = None,
                    margin: float = 1.0) -> torch.Tensor:
    """The loss the ascent pass minimises, averaged over the batch (`bound` in nats).

    "ce": -CE. "complement": -log(1 - p_y), CE towards "not the given label". For both, a
    sample whose CE is past `bound` gives no gradient. "margin": max(0, z_y - max_k!=y z_k +
    margin); it bounds itself, so `bound` is not used."""
    logits = logits.float()
    if kind == "margin":
        given = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
        return F.relu(given - others + margin).mean()
    ce = F.cross_entropy(logits, labels, reduction="none")
    if kind == "ce":
        return (-ce if bound is None else -ce.clamp(max=bound)).mean()
    # -log(1 - exp(-ce)), written with expm1 so that ce -> 0 stays finite
    per_sample = -torch.log(-torch.expm1(-ce.clamp(min=1e-12)))
    if bound is not None:
        per_sample = per_sample * (ce < bound)
    return per_sample.mean()


def stop_reason(suspected_accs: list[float], trusted_accs: list[float], trusted_before: float | None,
                cfg: UnlearnConfig, num_classes: int) -> str | None:
    """Why the stage should end after this epoch, or None (training data only).

    `suspected_accs`: the suspected set's accuracy before the stage and after each epoch so
    far; `trusted_accs`: the trusted set's after each epoch (empty without a trusted set);
    `trusted_before`: its accuracy before the stage (None without one)."""
    now = suspected_accs[-1]
    refitted = trusted_before is None or trusted_accs[-1] >= trusted_before - cfg.trusted_tolerance
    if cfg.stop == "unlearned" and now <= 0.0 or cfg.stop == "chance" and now <= 1.0 / num_classes:
        return cfg.stop if refitted else None   # unlearned: only relearning is left to finish
    window = cfg.stall_epochs
    # a suspected set already at chance while relearning is still refitting the trusted set is
    # not stalled: what is left is the relearning "unlearned" waits for (DLP's AU on BadNets
    # stopped at 3 % suspected accuracy with the trusted set recovering 0.22 -> 0.30 -> 0.33)
    recovering = (now <= 1.0 / num_classes and 0 < window < len(trusted_accs)
                  and trusted_accs[-1] - trusted_accs[-1 - window] > cfg.stall_delta)
    if 0 < window < len(suspected_accs) and suspected_accs[-1 - window] - now < cfg.stall_delta and not recovering:
        return "stalled"
    if 0 < cfg.stall_epochs < len(trusted_accs) and trusted_accs[-1 - cfg.stall_epochs] - trusted_accs[-1] > cfg.stall_delta:
        return "eroding"
    return None


def ascent_pass(engine: Engine, suspected: DeviceData, cfg: UnlearnConfig, num_classes: int,
                g: torch.Generator) -> dict:
    """One shuffled pass minimising the unlearning loss on the suspected set."""
    bound = cfg.bound_nats(num_classes)
    ces: list[float] = []

    def loss_fn(index: torch.Tensor) -> torch.Tensor:
        x, y = suspected.batch(index, cfg.augment, g)
        logits = engine.model(x)
        ces.append(float(F.cross_entropy(logits.detach().float(), y)))
        return unlearning_loss(logits, y, cfg.loss, bound, cfg.margin)

    set_batchnorm_mode(engine.model, cfg.batchnorm == "train")
    engine.run_pass(batch_indices(len(suspected), cfg.batch_size, g), loss_fn, "unlearn")
    set_batchnorm_mode(engine.model, True)
    return {"unlearn_ce": sum(ces) / max(len(ces), 1)}   # the suspected set's CE, for the log


def descent_pass(engine: Engine, trusted: DeviceData, cfg: UnlearnConfig, g: torch.Generator) -> dict:
    """One shuffled pass of CE on the trusted set."""
    def loss_fn(index: torch.Tensor) -> torch.Tensor:
        x, y = trusted.batch(index, cfg.augment, g)
        return F.cross_entropy(engine.model(x), y)

    return {"relearn_loss": engine.run_pass(batch_indices(len(trusted), cfg.batch_size, g), loss_fn, "relearn")}


def unlearn_epoch(suspected: DeviceData, trusted: DeviceData | None, cfg: UnlearnConfig, num_classes: int,
                  suspected_before: float = 1.0, trusted_before: float | None = None):
    """An epoch_fn for the Engine: ascent, descent (alternate), then the stop rules. Earlier
    epochs' accuracies come from the engine's history (kept in its checkpoint, so a resumed
    stage decides exactly as an unkilled one)."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        out: dict = {}
        if cfg.mode in ("alternate", "unlearn"):
            out.update(ascent_pass(engine, suspected, cfg, num_classes, g))
        if cfg.mode in ("alternate", "relearn") and trusted is not None:
            out.update(descent_pass(engine, trusted, cfg, g))
        if not cfg.measures_progress:
            return out
        engine.model.eval()
        out["suspected_acc"] = round(suspected_accuracy(engine.model, suspected), 4)
        if trusted is not None:
            out["trusted_acc"] = round(suspected_accuracy(engine.model, trusted), 4)
        engine.model.train()
        accs = [suspected_before] + [h["suspected_acc"] for h in engine.history] + [out["suspected_acc"]]
        trusted_accs = [h["trusted_acc"] for h in engine.history + [out] if "trusted_acc" in h]
        reason = stop_reason(accs, trusted_accs, trusted_before if trusted is not None else None, cfg, num_classes)
        out["stopped"] = reason is not None
        if reason:
            out["stop_reason"] = reason
        return out

    return epoch_fn


def unlearn(model: nn.Module, suspected: ImageSet, cfg: UnlearnConfig, runtime: Runtime, *,
            trusted: ImageSet | None = None, name: str = "unlearn", seed: int = 0, checkpoint_dir=None,
            log_path=None, on_epoch_end=None, progress: bool = True) -> nn.Module:
    """Unlearn `suspected` from `model` (in place; copy it first to keep the original) and
    return it in eval mode. `trusted` is needed for mode "alternate" and "relearn".

    The engine checkpoints every epoch under `checkpoint_dir/<name>.pt`, so a killed stage
    resumes where it stopped, and an epoch whose stop rule fired marks the stage finished."""
    if cfg.mode != "unlearn" and trusted is None:
        raise ValueError(f"unlearning mode {cfg.mode!r} needs a trusted set")
    suspected_data = DeviceData(suspected, runtime)
    trusted_data = DeviceData(trusted, runtime) if trusted is not None and cfg.mode != "unlearn" else None
    steps = (-(-len(suspected) // cfg.batch_size) * (cfg.mode != "relearn")
             + (-(-len(trusted_data) // cfg.batch_size) if trusted_data is not None else 0))
    model.requires_grad_(True)   # an EMA copy (e.g. FixMatch's output) comes with gradients off
    # the input model's own fit of both sets, for the stop rules: the ascent may cost some of the
    # trusted set's, and the stage does not end as unlearned before relearning has given it back
    suspected_before, trusted_before = 1.0, None
    if cfg.measures_progress:
        suspected_before = round(suspected_accuracy(model, suspected_data), 4)
        if trusted_data is not None:
            trusted_before = suspected_accuracy(model, trusted_data)
        already = stop_reason([suspected_before], [trusted_before] if trusted_before is not None else [],
                              trusted_before, cfg, suspected.num_classes)
        if already in ("chance", "unlearned"):   # nothing to unlearn: not a single step
            return model.eval()
    engine = Engine(model, cfg.optim, runtime, name=name, epochs=cfg.epochs, steps_per_epoch=steps, seed=seed,
                    checkpoint_dir=checkpoint_dir, log_path=log_path, on_epoch_end=on_epoch_end, progress=progress)
    epoch_fn = unlearn_epoch(suspected_data, trusted_data, cfg, suspected.num_classes, suspected_before,
                             trusted_before)
    return engine.fit(epoch_fn).eval()


def describe(cfg: UnlearnConfig) -> str:
    """One line for a run's notes: what the loop does and when it stops."""
    loss = cfg.loss if cfg.loss == "margin" else (
        f"{cfg.loss} " + ("unbounded" if cfg.bound is None else f"clipped at {cfg.bound:g} x ln C"))
    stops = {"never": [], "chance": ["the suspected set at chance"],
             "unlearned": ["no suspected image keeps its label"]}[cfg.stop]
    if cfg.stall_epochs:
        stops.append(f"stalled or eroding over {cfg.stall_epochs} epochs (delta {cfg.stall_delta:g})")
    return (f"{cfg.mode}, up to {cfg.epochs} epochs at lr {cfg.optim.lr:g}, ascent BN {cfg.batchnorm}, loss {loss}, "
            f"stops at {' or '.join(stops) if stops else 'the last epoch'}")
