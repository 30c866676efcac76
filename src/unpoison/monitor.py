"""Measuring a model from outside the method that trains it.

`Monitor` (`unpoison run`) has the ground truth: CA/ASR/RA after every stage and, when
asked, every epoch, plus training accuracy on poisoned vs clean samples. `HeldOutMonitor`
(the user commands) has none: only accuracy on held-out images. Both are attached as the
context's `on_epoch`/`on_stage` hooks and return nothing to the method, so it cannot
select on what they measure.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from .attacks.base import Attack, PoisonedSet
from .console import say
from .io import append_jsonl, read_jsonl
from .context import DefenseContext
from .data.imageset import ImageSet
from .metrics import accuracy, backdoor_metrics, subset_accuracy
from .report.user_page import HELD_OUT_JOURNAL, held_out_curves
from .runtime import Runtime, generator
from .train.supervised import predict

MONITOR_JOURNAL = "monitor.jsonl"


class Monitor:
    """Measures models from outside the defence: CA/ASR per stage (and per epoch when
    asked, on a fixed subsample) plus training accuracy on poisoned vs clean samples.

    With a journal (OUT/monitor.jsonl) every epoch's measurements and the run's elapsed time
    are appended as they happen, so a resumed run keeps the curves and the wall time of the
    epochs it does not train again."""

    def __init__(self, test: ImageSet, attack: Attack, poisoned: PoisonedSet, runtime: Runtime,
                 every_epoch: bool, seed: int, sample: int = 2000, journal: Path | None = None,
                 resume: bool = False, started: float | None = None) -> None:
        self.test, self.attack, self.runtime = test, attack, runtime
        self.every_epoch = every_epoch
        self.backdoor = attack.backdoor_test(test) if attack.name != "none" else None
        g = generator(seed, "monitor")
        self.test_sample = test.head(sample, g)
        self.train_sample, self.sample_is_poison = self._train_sample(poisoned, sample, g)
        self._curves: dict[tuple[str, int], dict] = {}
        self.stage_metrics: dict[str, dict] = {}
        self.journal, self.elapsed_before = journal, 0.0
        self.started = time.perf_counter() if started is None else started
        if journal is not None and resume and journal.is_file():
            self._replay(journal)

    def _replay(self, journal: Path) -> None:
        for entry in read_jsonl(journal):
            if "curve" in entry:
                self._curves[(entry["curve"]["stage"], entry["curve"]["epoch"])] = entry["curve"]
            self.elapsed_before = float(entry.get("elapsed", self.elapsed_before))

    @property
    def curves(self) -> list[dict]:
        """Per-epoch records in the order first measured (an epoch trained again replaces its record)."""
        return list(self._curves.values())

    def elapsed(self) -> float:
        """Wall seconds of the run, including the sessions before a resume."""
        return self.elapsed_before + time.perf_counter() - self.started

    def _log(self, entry: dict) -> None:
        if self.journal is not None:
            append_jsonl(self.journal, {**entry, "elapsed": round(self.elapsed(), 2)})

    @staticmethod
    def _train_sample(poisoned: PoisonedSet, n: int, g: torch.Generator):
        poison = poisoned.poison_index
        clean = (~poisoned.is_poison).nonzero().flatten()
        pick = torch.cat([poison[torch.randperm(len(poison), generator=g)[: n // 2]],
                          clean[torch.randperm(len(clean), generator=g)[: n // 2]]])
        return poisoned.train.subset(pick), poisoned.is_poison[pick]

    def on_epoch(self, stage: str, model: nn.Module, epoch: int) -> None:
        if not self.every_epoch:
            self._log({"stage": stage, "epoch": epoch + 1})
            return
        record = {"stage": stage, "epoch": epoch + 1}
        record.update(backdoor_metrics(model, self.test_sample, self.attack, self.runtime))
        record.update(subset_accuracy(model, self.train_sample, self.sample_is_poison, self.runtime))
        self._curves[(stage, epoch + 1)] = record
        self._log({"curve": record})
        shown = " ".join(f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float))
        print(f"[monitor] {stage} epoch {epoch + 1}: {shown}", file=sys.stderr, flush=True)

    def on_stage(self, stage: str, model: nn.Module) -> None:
        metrics = backdoor_metrics(model, self.test, self.attack, self.runtime, self.backdoor)
        self.stage_metrics[stage] = metrics
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        print(f"[monitor] after stage {stage}: {shown}", file=sys.stderr, flush=True)


class HeldOutMonitor:
    """Accuracy on held-out images after every stage (and every epoch, on at most
    `sample` images). It returns nothing to the defence. Per-epoch lines are appended
    to OUT/heldout.jsonl, so a resumed run keeps the curve of the epochs before the kill."""

    def __init__(self, held_out: ImageSet | None, runtime: Runtime, out: Path, seed: int, sample: int = 2000) -> None:
        self.held_out, self.runtime, self.path = held_out, runtime, out / HELD_OUT_JOURNAL
        self.sample = held_out.head(sample, generator(seed, "held-out-sample")) if held_out is not None else None
        self.stages: dict[str, float] = {}

    def attach(self, ctx: DefenseContext) -> DefenseContext:
        ctx.on_epoch, ctx.on_stage = self.on_epoch, self.on_stage
        return ctx

    def on_epoch(self, stage: str, model: nn.Module, epoch: int) -> None:
        if self.sample is None:
            return
        acc = held_out_accuracy(model, self.sample, self.runtime)
        append_jsonl(self.path, {"stage": stage, "epoch": epoch + 1, "held_out_acc": acc})

    def on_stage(self, stage: str, model: nn.Module) -> None:
        if self.held_out is None:
            return
        self.stages[stage] = held_out_accuracy(model, self.held_out, self.runtime)
        say(f"[held-out] after stage {stage}: accuracy {self.stages[stage]:.4f}")

    def curves(self) -> list[dict]:
        return held_out_curves(self.path.parent)

    def accuracy(self, model: nn.Module) -> float | None:
        """Accuracy on every held-out image (None without held-out images): the final number,
        and in `repair` the number before."""
        return held_out_accuracy(model, self.held_out, self.runtime) if self.held_out is not None else None


def held_out_accuracy(model: nn.Module, data: ImageSet, runtime: Runtime) -> float:
    return accuracy(predict(model, data.images, runtime), data.labels)
