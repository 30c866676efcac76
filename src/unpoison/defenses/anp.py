"""ANP: adversarial neuron pruning (Wu & Wang, NeurIPS 2021).

A backdoored network's backdoor neurons are the ones whose small perturbation makes it
misbehave on clean data. ANP learns a mask m in [0, 1] per neuron (a BatchNorm channel)
by

    min_m  alpha * L(m, 0) + (1 - alpha) * max_{|delta|, |xi| <= eps} L(m + delta, 1 + xi)

on the clean reference, where a neuron's BN scale is multiplied by (m + delta) and its
shift by (1 + xi). Each iteration (the official code, anp_steps = 1): draw delta, xi
uniformly in [-eps, eps], take one ascent step of size eps on the clean CE and clip back
to [-eps, eps]; then one SGD step (lr 0.2, momentum 0.9) on the mask, clipped to [0, 1].
Finally, every neuron whose mask is below `threshold` is pruned (its BN scale set to 0)
in the original model.

Settings are the paper's: eps 0.4, alpha 0.2, 2000 iterations of batch 128, threshold 0.2.
The paper fixes the threshold at 0.2 and so do we; the official scripts also sweep pruning
ratios against the test set, which we do not. The mask is optimised with the network in
train mode (the official code; BatchNorm then normalises each clean batch with its own
statistics), on a copy: the pruned model keeps the backdoored model's running statistics.
`quick` runs 500 iterations (a mask per neuron converges long before 2000 on 2,500 images).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batches import endless_indices
from ..data.imageset import ImageSet
from ..distributed import average_gradients
from ..train.engine import Engine, OptimConfig
from ..train.supervised import DeviceData
from .base import DefenseContext, DefenseResult, StageTimer
from .posttraining import PostTrainingRepair, clean_accuracy

ITERATIONS_PER_EPOCH = 100   # the mask's checkpoint interval (one "epoch" of the engine)


@dataclass
class ANPConfig:
    iterations: int = 2000
    batch_size: int = 128
    eps: float = 0.4          # bound of the multiplicative neuron perturbation
    alpha: float = 0.2        # weight of the unperturbed loss
    mask_lr: float = 0.2
    threshold: float = 0.2    # prune neurons whose mask ends below this
    augment: str = "weak"
    min_clean: int = 100

    @property
    def epochs(self) -> int:
        return -(-self.iterations // ITERATIONS_PER_EPOCH)

    @classmethod
    def for_profile(cls, profile: str) -> "ANPConfig":
        if profile == "quick":
            return cls(iterations=500)
        if profile == "smoke":
            # tests on a toy backdoor: its few neurons need a wider perturbation
            return cls(iterations=100, batch_size=64, eps=0.5, min_clean=20)
        return cls()


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class PerturbedNetwork(nn.Module):
    """`model` with a mask and a perturbation on every BatchNorm channel:
    scale * (mask [+ delta]) and shift * (1 [+ xi]). Only the masks are parameters to train."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        layers = batchnorm_layers(model)
        if not layers:
            raise ValueError(f"ANP perturbs BatchNorm neurons; {type(model).__name__} has no BatchNorm layer")
        self.masks = nn.ParameterList(nn.Parameter(torch.ones(m.num_features)) for m in layers)
        self.scale_noise: list[torch.Tensor] = []
        self.shift_noise: list[torch.Tensor] = []
        self.perturbed = False
        for i, layer in enumerate(layers):
            layer.forward = self._forward_of(layer, i)

    def _forward_of(self, layer: nn.modules.batchnorm._BatchNorm, i: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            scale, shift = self.masks[i], torch.ones_like(self.masks[i])
            if self.perturbed:
                scale, shift = scale + self.scale_noise[i], shift + self.shift_noise[i]
            use_batch_stats = layer.training or layer.running_mean is None
            return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight * scale, layer.bias * shift,
                                use_batch_stats, layer.momentum if layer.momentum is not None else 0.1, layer.eps)
        return forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def draw_noise(self, eps: float, g: torch.Generator) -> list[torch.Tensor]:
        """Fresh perturbations, uniform in [-eps, eps] (a random start each iteration)."""
        def draw(mask):
            return ((torch.rand(mask.shape, generator=g) * 2 - 1) * eps).to(mask.device).requires_grad_(True)
        self.scale_noise = [draw(m) for m in self.masks]
        self.shift_noise = [draw(m) for m in self.masks]
        return self.scale_noise + self.shift_noise

    @torch.no_grad()
    def clip_masks(self) -> None:
        for mask in self.masks:
            mask.clamp_(0, 1)


def anp_epoch(net: PerturbedNetwork, data: DeviceData, cfg: ANPConfig):
    """An epoch_fn: ITERATIONS_PER_EPOCH ANP iterations (fewer in the last epoch)."""

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        stream = endless_indices(len(data), cfg.batch_size, g)
        n = min(ITERATIONS_PER_EPOCH, cfg.iterations - epoch * ITERATIONS_PER_EPOCH)
        batches = [next(stream) for _ in range(n)]
        robust = []

        def loss_fn(index: torch.Tensor) -> torch.Tensor:
            net.clip_masks()
            x, y = data.batch(index, cfg.augment, g)
            # the inner max: a random start in the eps-box, one ascent step of size eps, clipped
            noise = net.draw_noise(cfg.eps, g)
            net.perturbed = True
            grads = torch.autograd.grad(F.cross_entropy(net(x).float(), y), noise)
            average_gradients(list(grads))   # under torchrun: each rank holds its slice's share
            with torch.no_grad():
                for t, grad in zip(noise, grads):
                    t.add_(cfg.eps * grad).clamp_(-cfg.eps, cfg.eps)
            loss_robust = F.cross_entropy(net(x), y)
            net.perturbed = False
            loss_natural = F.cross_entropy(net(x), y)
            robust.append(float(loss_robust.detach()))
            return cfg.alpha * loss_natural + (1 - cfg.alpha) * loss_robust

        engine.run_pass(batches, loss_fn)
        net.clip_masks()
        return {"robust_loss": round(sum(robust) / max(len(robust), 1), 4)}

    return epoch_fn


@torch.no_grad()
def prune_neurons(model: nn.Module, masks: list[torch.Tensor], threshold: float) -> tuple[nn.Module, int]:
    """A copy of `model` with the BN scale of every neuron whose mask is below `threshold` set to 0."""
    pruned = copy.deepcopy(model)
    count = 0
    for layer, mask in zip(batchnorm_layers(pruned), masks):
        off = mask.detach().to(layer.weight.device) < threshold
        layer.weight[off] = 0
        count += int(off.sum())
    return pruned.eval(), count


class ANP(PostTrainingRepair):
    name = "anp"
    Config = ANPConfig
    main_epochs = "iterations"

    def repair_stages(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, timer: StageTimer) -> DefenseResult:
        cfg = self.config
        masks = timer.run("mask", cfg.iterations, lambda: self._optimise_masks(model, clean, ctx))
        pruned, count = prune_neurons(model, masks, cfg.threshold)
        ctx.on_stage("prune", pruned)
        total = sum(len(m) for m in masks)
        return DefenseResult(pruned, stages=timer.records, notes=[
            f"ANP mask: {cfg.iterations} iterations (eps {cfg.eps}, alpha {cfg.alpha}); pruned {count} of {total} "
            f"neurons with mask < {cfg.threshold} (the paper's fixed threshold); clean-reference accuracy "
            f"{clean_accuracy(pruned, clean, ctx):.4f}"])

    def _optimise_masks(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext) -> list[torch.Tensor]:
        cfg = self.config
        net = PerturbedNetwork(copy.deepcopy(model))
        optim = OptimConfig(lr=cfg.mask_lr, momentum=0.9, nesterov=False, weight_decay=0.0, schedule="constant")
        engine = Engine(net, optim, ctx.runtime, name="anp-mask", epochs=cfg.epochs,
                        steps_per_epoch=ITERATIONS_PER_EPOCH, seed=ctx.seed, params=net.masks.parameters(),
                        checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path, progress=ctx.progress)
        engine.fit(anp_epoch(net, DeviceData(clean, ctx.runtime), cfg))
        return [m.detach().cpu() for m in net.masks]
