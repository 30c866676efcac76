"""MCR: mode connectivity repair (Zhao et al., ICLR 2020, "Bridging mode connectivity in loss
landscapes and adversarial robustness"), on the curve-fitting method of Garipov et al. 2018.

    1. Two end models theta_0, theta_1. The paper connects two backdoored models; a defender
       with one model (our case, and the common single-model form) takes the backdoored
       model and that model fine-tuned on the clean reference (FT's recipe).
    2. A quadratic Bezier curve  phi(t) = (1-t)^2 theta_0 + 2t(1-t) theta_b + t^2 theta_1,
       the bend theta_b initialised at the endpoints' mean, is fitted on the clean reference
       only: minimise E_{t ~ U[0,1]} CE(phi(t)) (one t per batch), endpoints fixed.
    3. The repaired model is phi(t) at a fixed t, with BatchNorm statistics recomputed on
       the clean reference (each point of the curve needs its own).

The paper reads the whole curve's clean and backdoor accuracy on test data and shows that
the backdoor is gone for a wide middle range of t while clean accuracy holds; choosing t
from such a plot uses the test set and the trigger, so `t` is fixed at 0.5, the middle of
the curve, farthest from both endpoints. Curve fitting: SGD momentum 0.9, wd 5e-4, lr 0.015
(Garipov et al.'s curve recipe; their piecewise-linear decay is replaced by cosine), batch
128, 100 epochs over the clean reference (`quick`: 30). `smoke` (tests on a toy backdoor
whose curve keeps the backdoor longer) returns t = 0.7.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data import augment
from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData, TrainConfig
from .base import DefenseContext, DefenseResult, StageTimer
from .ft import fine_tune, fine_tune_recipe
from .posttraining import PostTrainingRepair, clean_accuracy


@dataclass
class MCRConfig:
    endpoint: TrainConfig = field(default_factory=lambda: fine_tune_recipe("paper"))
    epochs: int = 100
    batch_size: int = 128
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=0.015, momentum=0.9, nesterov=False, weight_decay=5e-4, schedule="cosine"))
    augment: str = "weak"
    t: float = 0.5            # the point of the curve returned (fixed: see the module doc)
    min_clean: int = 100

    @classmethod
    def for_profile(cls, profile: str) -> "MCRConfig":
        if profile == "quick":
            return cls(epochs=30)
        if profile == "smoke":
            return cls(endpoint=fine_tune_recipe("smoke", 0.05), epochs=8, batch_size=32, t=0.7, min_clean=20)
        return cls()


class BezierCurve(nn.Module):
    """A quadratic Bezier curve between two fixed models of one architecture; the bend's
    parameters are trained, its buffers (BatchNorm statistics) serve every point in training."""

    def __init__(self, start: nn.Module, end: nn.Module) -> None:
        super().__init__()
        self.start = copy.deepcopy(start).requires_grad_(False)
        self.end = copy.deepcopy(end).requires_grad_(False)
        self.bend = copy.deepcopy(start).requires_grad_(True)
        with torch.no_grad():
            for b, p0, p1 in zip(self.bend.parameters(), self.start.parameters(), self.end.parameters()):
                b.copy_((p0 + p1) / 2)
        self.t = 0.5

    def weights(self, t: float) -> dict[str, torch.Tensor]:
        start, end = dict(self.start.named_parameters()), dict(self.end.named_parameters())
        return {name: (1 - t) ** 2 * start[name] + 2 * t * (1 - t) * bend + t ** 2 * end[name]
                for name, bend in self.bend.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.bend, self.weights(self.t), (x,))

    @torch.no_grad()
    def model_at(self, t: float) -> nn.Module:
        model = copy.deepcopy(self.bend)
        for name, value in self.weights(t).items():
            model.get_parameter(name).copy_(value)
        return model


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, clean: ImageSet, ctx: DefenseContext, batch_size: int = 256) -> nn.Module:
    """BatchNorm running statistics as the exact average over the clean reference."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None          # cumulative average
    model.train()
    for start in range(0, len(clean), batch_size):
        x = augment.to_float(clean.images[start:start + batch_size].to(ctx.runtime.device))
        with ctx.runtime.autocast():
            model(ctx.runtime.to_device(x))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    return model.eval()


def curve_epoch(curve: BezierCurve, data: DeviceData, cfg: MCRConfig):
    """An epoch_fn: one pass over the clean reference, each batch at a random t."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> None:
        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = data.batch(index, cfg.augment, g)
            curve.t = float(torch.rand((), generator=g))
            return F.cross_entropy(curve(x), y)

        engine.run_pass(batch_indices(len(data), cfg.batch_size, g), loss_fn)

    return epoch_fn


class MCR(PostTrainingRepair):
    name = "mcr"
    Config = MCRConfig

    def repair_stages(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, timer: StageTimer) -> DefenseResult:
        cfg = self.config
        if not 0 <= cfg.t <= 1:
            raise ValueError(f"MCR t must lie in [0, 1], got {cfg.t}")
        end = timer.run("endpoint", cfg.endpoint.epochs,
                        lambda: fine_tune(model, clean, cfg.endpoint, ctx, "mcr-endpoint"))
        curve = timer.run("curve", cfg.epochs, lambda: self._fit_curve(model, end, clean, ctx), model_of=lambda c: None)
        repaired = recompute_batchnorm(curve.model_at(cfg.t), clean, ctx)
        ctx.on_stage("point", repaired)
        return DefenseResult(repaired, stages=timer.records, notes=[
            f"curve between the backdoored model and its {cfg.endpoint.epochs}-epoch fine-tune, fitted "
            f"{cfg.epochs} epochs on the clean reference; returned t = {cfg.t} (fixed, not chosen on test data), "
            f"BN statistics recomputed on the clean reference; clean-reference accuracy "
            f"{clean_accuracy(repaired, clean, ctx):.4f}"])

    def _fit_curve(self, start: nn.Module, end: nn.Module, clean: ImageSet, ctx: DefenseContext) -> BezierCurve:
        cfg = self.config
        curve = BezierCurve(start, end)
        engine = Engine(curve, cfg.optim, ctx.runtime, name="mcr-curve", epochs=cfg.epochs,
                        steps_per_epoch=-(-len(clean) // cfg.batch_size), seed=ctx.seed,
                        params=curve.bend.parameters(), checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                        progress=ctx.progress)
        engine.fit(curve_epoch(curve, DeviceData(clean, ctx.runtime), cfg))
        return curve
