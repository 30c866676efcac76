"""NAD: neural attention distillation (Li et al., ICLR 2021).

    1. Teacher: the backdoored model fine-tuned on the clean reference (FT, 10 epochs).
    2. Student: the backdoored model again, trained on the clean reference with
           CE(student(x), y) + sum_k beta_k * AT(student_k(x), teacher_k(x)),
       where k runs over the outputs of the network's three residual groups and
           A(F) = sum_c |F_c|^p / || sum_c |F_c|^p ||_2   (p = 2, over the spatial map),
           AT = mean squared difference of the two attention maps.
    3. The student's last epoch is returned.

Settings are the official code's (the paper gives no others): 20 epochs, batch 64, SGD
Nesterov 0.9, wd 1e-4, lr 0.1 for two epochs then 0.01, crop + flip; beta = (0, 0, 5000):
only the last group is distilled. The official script saves the epoch whose test clean
accuracy passes a threshold and whose backdoored-test accuracy is lowest; that reads the
test set and the trigger, so the last epoch is returned instead. `smoke` (tests on a toy
backdoor of 16x16 images) uses beta 500 and lr 0.01: at 5000 the attention term swamps CE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import batch_indices
from ..data.imageset import ImageSet
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData, TrainConfig
from .base import DefenseContext, DefenseResult, StageTimer
from .ft import fine_tune, fine_tune_recipe, nad_schedule, smoke_schedule
from .posttraining import PostTrainingRepair, trainable_copy


@dataclass
class NADConfig:
    teacher: TrainConfig = field(default_factory=lambda: fine_tune_recipe("paper"))
    epochs: int = 20
    batch_size: int = 64
    optim: OptimConfig = field(default_factory=lambda: nad_schedule(20))
    augment: str = "weak"
    betas: tuple[float, ...] = (0.0, 0.0, 5000.0)   # per residual group, shallow to deep
    power: float = 2.0
    min_clean: int = 100

    @classmethod
    def for_profile(cls, profile: str) -> "NADConfig":
        if profile == "smoke":
            return cls(teacher=fine_tune_recipe("smoke", 0.01), epochs=3, batch_size=32, optim=smoke_schedule(0.01),
                       betas=(0.0, 0.0, 500.0), min_clean=20)
        return cls()


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs NAD distils: the residual groups, shallow to deep."""
    if all(hasattr(model, name) for name in ("block1", "block2", "block3")):   # WRN, as in the paper
        return [model.block1, model.block2, model.block3]
    if hasattr(model, "layers") and len(model.layers) == 8:   # ResNet-18: the last block of stages 2-4
        return [model.layers[3], model.layers[5], model.layers[7]]
    raise ValueError(f"NAD needs a model with residual groups (WRN, ResNet); {type(model).__name__} has none")


def attention_map(feature_map: torch.Tensor, power: float) -> torch.Tensor:
    """sum over channels of |F|^p, L2-normalised over the spatial positions (NAD's AT)."""
    summed = feature_map.float().abs().pow(power).sum(1).flatten(1)
    return summed / (summed.norm(dim=1, keepdim=True) + 1e-6)


class GroupOutputs:
    """Forward hooks that keep the latest output of each attention layer."""

    def __init__(self, model: nn.Module) -> None:
        self.outputs: list[torch.Tensor | None] = [None] * 3
        layers = attention_layers(model)
        self.handles = [layer.register_forward_hook(self._keep(i)) for i, layer in enumerate(layers)]

    def _keep(self, i: int):
        def hook(module, inputs, output):
            self.outputs[i] = output
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def distillation_epoch(student_hooks: GroupOutputs, teacher: nn.Module, teacher_hooks: GroupOutputs,
                       data: DeviceData, cfg: NADConfig):
    """An epoch_fn: CE plus the weighted attention distances to the frozen teacher."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        totals = {"at_loss": 0.0}

        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            x, y = data.batch(index, cfg.augment, g)
            with torch.no_grad():
                teacher(x)
            loss = F.cross_entropy(engine.model(x), y)
            at = sum(beta * F.mse_loss(attention_map(s, cfg.power), attention_map(t, cfg.power))
                     for beta, s, t in zip(cfg.betas, student_hooks.outputs, teacher_hooks.outputs) if beta)
            totals["at_loss"] += float(at.detach()) if torch.is_tensor(at) else float(at)
            return loss + at

        batches = batch_indices(len(data), cfg.batch_size, g)
        engine.run_pass(batches, loss_fn)
        return {"at_loss": round(totals["at_loss"] / max(len(batches), 1), 5)}

    return epoch_fn


def distill(student: nn.Module, teacher: nn.Module, clean: ImageSet, ctx: DefenseContext, cfg: NADConfig) -> nn.Module:
    """Step 2: the student trained on the clean reference with CE plus attention distillation
    from the frozen teacher; its last epoch."""
    teacher = teacher.eval().requires_grad_(False)
    student_hooks, teacher_hooks = GroupOutputs(student), GroupOutputs(teacher)
    engine = Engine(student, cfg.optim, ctx.runtime, name="nad-student", epochs=cfg.epochs,
                    steps_per_epoch=-(-len(clean) // cfg.batch_size), seed=ctx.seed,
                    checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                    on_epoch_end=ctx.epoch_hook("distill"), progress=ctx.progress)
    try:
        epoch_fn = distillation_epoch(student_hooks, teacher, teacher_hooks, DeviceData(clean, ctx.runtime), cfg)
        return engine.fit(epoch_fn).eval()
    finally:
        student_hooks.remove()
        teacher_hooks.remove()


class NAD(PostTrainingRepair):
    name = "nad"
    Config = NADConfig

    def repair_stages(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, timer: StageTimer) -> DefenseResult:
        cfg = self.config
        if len(cfg.betas) != 3:
            raise ValueError(f"NAD betas: one per residual group (3), got {len(cfg.betas)}")
        teacher = timer.run("teacher", cfg.teacher.epochs,
                            lambda: fine_tune(model, clean, cfg.teacher, ctx, "nad-teacher"))
        student = timer.run("distill", cfg.epochs, lambda: distill(trainable_copy(model), teacher, clean, ctx, cfg))
        return DefenseResult(student, stages=timer.records, notes=[
            f"teacher fine-tuned {cfg.teacher.epochs} epochs; student distilled {cfg.epochs} epochs with "
            f"betas {list(cfg.betas)}; last epoch returned"])
