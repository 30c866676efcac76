"""The one training loop every stage of every method runs on.

An `Engine` owns a model, its optimiser, the learning-rate schedule, an optional EMA
of the weights, and checkpoints. What one epoch *does* is a function the caller gives
(`epoch_fn`): usually one pass of a loss over shuffled batches (`run_pass`), but CBD's
critic pass, D-BR's unlearn/relearn pair or FixMatch's two streams are the same thing
with a different loss. The engine checkpoints after every epoch, and an epoch's
randomness (batch order, augmentation, dropout) comes only from (seed, stage, epoch),
so a run resumed after a kill finishes with exactly the weights of an unkilled run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..distributed import average_gradients, is_main, main_decides
from ..io import append_jsonl
from ..runtime import Runtime, derive_seed, generator

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule of one training stage."""

    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    # constant | cosine | multistep | onecycle (linear warm-up then linear decay to 0)
    # | fixmatch_cosine (lr * cos(7 pi t / 16): FixMatch's decay, ending at ~0.2 lr)
    schedule: str = "cosine"
    milestones: tuple[float, ...] = ()   # epochs where multistep multiplies the lr by gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start: float = 0.0            # fraction of lr at the start of warm-up
    min_lr_fraction: float = 0.0         # cosine floor, as a fraction of lr
    optimizer: str = "sgd"               # sgd | adam
    decay_norm_and_bias: bool = True     # False: no weight decay on BN and bias (FixMatch port)
    # BatchNorm shifts train at this multiple of the lr, with their weight decay divided by it
    # so each step decays them as much as the other weights (airbench's "bias scaler")
    norm_bias_lr_scale: float = 1.0


def lr_at(cfg: OptimConfig, progress: float, total_epochs: float) -> float:
    """Learning rate at `progress` epochs into a stage of `total_epochs` epochs."""
    if cfg.schedule == "onecycle":
        peak = max(cfg.warmup_epochs, 1e-8)
        if progress < peak:
            return cfg.lr * (cfg.warmup_start + (1 - cfg.warmup_start) * progress / peak)
        return cfg.lr * max(0.0, (total_epochs - progress) / max(total_epochs - peak, 1e-8))
    if cfg.schedule == "constant":
        base = cfg.lr
    elif cfg.schedule == "cosine":
        floor = cfg.lr * cfg.min_lr_fraction
        base = floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress / max(total_epochs, 1e-8), 1.0)))
    elif cfg.schedule == "fixmatch_cosine":
        base = cfg.lr * math.cos(7 * math.pi * min(progress / max(total_epochs, 1e-8), 1.0) / 16)
    elif cfg.schedule == "multistep":
        base = cfg.lr * cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if progress < cfg.warmup_epochs:
        base *= cfg.warmup_start + (1 - cfg.warmup_start) * progress / cfg.warmup_epochs
    return base


def make_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig,
                   model: nn.Module | None = None) -> torch.optim.Optimizer:
    """Each param group carries an `lr_scale`: its lr is the schedule's times that."""
    params = [p for p in params if p.requires_grad]
    if cfg.decay_norm_and_bias:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    if cfg.norm_bias_lr_scale != 1.0 and model is not None:
        shifts = {id(m.bias) for m in model.modules()
                  if isinstance(m, nn.modules.batchnorm._NormBase) and m.bias is not None}
        scaled = [p for p in params if id(p) in shifts]
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in shifts]
        groups.append({"params": scaled, "lr_scale": cfg.norm_bias_lr_scale,
                       "weight_decay": (cfg.weight_decay if cfg.decay_norm_and_bias else 0.0) / cfg.norm_bias_lr_scale})
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


class EMA:
    """Exponential moving average of weights (buffers such as BN statistics are copied).

    The decay ramps up as (1 + k) / (10 + k) so a short run is not dominated by the
    random initial weights."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    return 1


class Engine:
    """Train `model` for `epochs` epochs of `steps_per_epoch` optimiser steps each."""

    def __init__(self, model: nn.Module, optim: OptimConfig, runtime: Runtime, *, name: str, epochs: int,
                 steps_per_epoch: int, seed: int = 0, checkpoint_dir: str | os.PathLike | None = None,
                 ema_decay: float | None = None, params: Iterable[nn.Parameter] | None = None,
                 extra_state: dict[str, Any] | None = None, log_path: str | os.PathLike | None = None,
                 on_epoch_end: Callable[[nn.Module, int], dict | None] | None = None,
                 progress: bool = True, grad_clip: float | None = None) -> None:
        self.runtime = runtime
        self.model = runtime.prepare_model(model)
        self.optim_cfg = optim
        self.optimizer = make_optimizer(params if params is not None else self.model.parameters(), optim, self.model)
        self.name, self.epochs, self.seed = name, epochs, seed
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.ema = EMA(self.model, ema_decay) if ema_decay else None
        self.extra_state = extra_state or {}
        self.checkpoint = Path(checkpoint_dir) / f"{name}.pt" if checkpoint_dir else None
        self.log_path = Path(log_path) if log_path else None
        self.on_epoch_end = on_epoch_end
        self.progress = progress
        self.grad_clip = grad_clip
        self.step_count = 0
        self.epoch = 0
        self.history: list[dict] = []
        self._loss_sum = 0.0
        self._loss_n = 0
        self._images = 0

    # ------------------------------------------------------------------ stepping
    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and return: the EMA copy when there is one."""
        return self.ema.model if self.ema else self.model

    @property
    def lr(self) -> float:
        return lr_at(self.optim_cfg, self.step_count / self.steps_per_epoch, self.epochs)

    def step(self, loss: torch.Tensor, images: int = 0) -> float:
        """Backward `loss` and take one optimiser step at the scheduled learning rate."""
        if not torch.isfinite(loss):
            raise FloatingPointError(f"[{self.name}] loss became {loss.item()} at step {self.step_count}; "
                                     "lower the learning rate")
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # under torchrun: every rank computed the same loss over the whole batch, each with
        # its slice's share of the backbone's gradients; the average is one process's gradient
        average_gradients([p.grad for group in self.optimizer.param_groups for p in group["params"]])
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.model)
        self.step_count += 1
        value = float(loss.detach())
        self._loss_sum += value
        self._loss_n += 1
        self._images += images
        return value

    def run_pass(self, batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor], desc: str = "") -> float:
        """One pass: for each batch, loss_fn(batch) under autocast, then a step. Returns mean loss."""
        total, count, images = 0.0, 0, 0
        batches = list(batches) if not hasattr(batches, "__len__") else batches
        bar = self._bar(batches, desc)
        start = time.perf_counter()
        for batch in bar:
            with self.runtime.autocast():
                loss = loss_fn(batch)
            images += _batch_size(batch)
            total += self.step(loss, _batch_size(batch))
            count += 1
            if bar is not batches and count % 10 == 0:
                rate = images / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{total / count:.3f}", img_s=f"{rate:.0f}", refresh=False)
        return total / max(count, 1)

    def _bar(self, batches, desc):
        if not self.progress or tqdm is None:
            return batches
        return tqdm(batches, desc=f"{self.name} {self.epoch + 1}/{self.epochs} {desc}".strip(), leave=False,
                    unit="batch", dynamic_ncols=True, disable=None, file=sys.stderr)

    # ------------------------------------------------------------------ epochs
    def fit(self, epoch_fn: Callable[["Engine", int, torch.Generator], dict | None]) -> nn.Module:
        """Run the remaining epochs (resuming from the checkpoint) and return eval_model."""
        if self._load():
            if self.epoch >= self.epochs:
                return self.eval_model
        for epoch in range(self.epoch, self.epochs):
            self.epoch = epoch
            g = generator(self.seed, self.name, epoch)
            torch.manual_seed(derive_seed(self.seed, self.name, epoch, "global"))
            self.model.train()
            self._loss_sum, self._loss_n, self._images = 0.0, 0, 0
            start = time.perf_counter()
            extra = epoch_fn(self, epoch, g) or {}
            seconds = time.perf_counter() - start
            record = {"stage": self.name, "epoch": epoch + 1, "epochs": self.epochs,
                      "lr": lr_at(self.optim_cfg, max(self.step_count - 1, 0) / self.steps_per_epoch, self.epochs),
                      "loss": self._loss_sum / max(self._loss_n, 1), "seconds": round(seconds, 2),
                      "img_per_s": round(self._images / max(seconds, 1e-9), 1), **extra}
            if self.on_epoch_end:
                record.update(self.on_epoch_end(self.eval_model, epoch) or {})
                self.model.train()
            self.history.append(record)
            # an epoch_fn that reports {"stopped": True} ends the stage (e.g. unlearning that
            # has reached its goal); the checkpoint then marks the stage as finished
            self.epoch = self.epochs if extra.get("stopped") else epoch + 1
            self._log(record)
            self._save()
            self.runtime.check_deadline(f"{self.name} epoch {epoch + 1}")   # after the save: resumable
            if extra.get("stopped"):
                break
        return self.eval_model

    def _log(self, record: dict) -> None:
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in record.items() if k not in ("stage", "epoch", "epochs"))
        print(f"[{self.name}] epoch {record['epoch']}/{record['epochs']} {shown}", file=sys.stderr, flush=True)
        if self.log_path:
            append_jsonl(self.log_path, record)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": "unpoison-engine-checkpoint", "name": self.name, "epoch": self.epoch,
            "step_count": self.step_count, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "extra": {k: v.state_dict() for k, v in self.extra_state.items()},
            "history": json.dumps(self.history), "optim_cfg": json.dumps(asdict(self.optim_cfg)),
        }

    def _save(self) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(self.state_dict(), self.checkpoint)

    def _load(self) -> bool:
        # rank 0 decides for all, so no rank starts afresh while another resumes; the state is
        # complete (not per rank), so a checkpoint resumes on any number of ranks
        if self.checkpoint is None or not main_decides(self.checkpoint.exists()):
            return False
        state = torch.load(self.checkpoint, map_location=self.runtime.device, weights_only=True)
        if state.get("format") != "unpoison-engine-checkpoint" or state.get("name") != self.name:
            raise ValueError(f"{self.checkpoint} is not a checkpoint of stage {self.name!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        for key, obj in self.extra_state.items():
            obj.load_state_dict(state["extra"][key])
        self.epoch, self.step_count = int(state["epoch"]), int(state["step_count"])
        self.history = json.loads(state["history"])
        print(f"[{self.name}] resumed after epoch {self.epoch}/{self.epochs} from {self.checkpoint}",
              file=sys.stderr, flush=True)
        return True


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file.
    Under torchrun only rank 0 writes."""
    if not is_main():
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
