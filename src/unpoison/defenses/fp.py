"""FP: fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018).

    1. Run the clean reference through the backdoored model and record the mean activation
       of every channel of the last convolutional layer (what the classifier head reads).
    2. Prune channels in increasing order of that activation (dormant on clean data first:
       the backdoor hides in neurons clean inputs do not use), as long as accuracy on the
       clean reference stays within `max_acc_drop` of the unpruned model's (the paper stops
       at a 4 % drop on clean validation data).
    3. Fine-tune the pruned model on the clean reference (the pruned channels stay pruned).

Our models end in BN-ReLU, global average pooling and a linear head, so a pruned last-layer
channel is a zeroed column of the head: the search over pruning ratios is exact and costs
one feature pass. The pruning rule reads the clean reference only (no test labels, no
trigger); BackdoorBench's choice of ratio by test accuracy is not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..train.supervised import TrainConfig, extract_features
from .base import DefenseContext, DefenseResult, StageTimer
from .ft import fine_tune, fine_tune_recipe
from .posttraining import PostTrainingRepair, clean_accuracy, trainable_copy


@dataclass
class FPConfig:
    max_acc_drop: float = 0.04    # the paper: prune until clean accuracy has fallen 4 points
    finetune: TrainConfig = field(default_factory=lambda: fine_tune_recipe("paper"))
    min_clean: int = 100

    @classmethod
    def for_profile(cls, profile: str) -> "FPConfig":
        if profile == "smoke":
            return cls(finetune=fine_tune_recipe("smoke"), min_clean=20)
        return cls()


def pruning_order(features: torch.Tensor) -> torch.Tensor:
    """Channels by increasing mean activation on the clean reference."""
    return features.float().mean(0).argsort()


@torch.no_grad()
def choose_pruned(features: torch.Tensor, labels: torch.Tensor, head: nn.Linear, max_acc_drop: float) -> torch.Tensor:
    """The largest prefix of `pruning_order` whose removal keeps accuracy on the clean
    reference within `max_acc_drop` of the unpruned model's; a bool mask of pruned channels."""
    weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
    features = features.float()

    def accuracy(keep: torch.Tensor) -> float:
        return float(((features * keep) @ weight.T + bias).argmax(1).eq(labels).float().mean())

    keep = torch.ones(features.shape[1])
    floor = accuracy(keep) - max_acc_drop
    pruned = torch.zeros(features.shape[1], dtype=torch.bool)
    for channel in pruning_order(features)[:-1].tolist():   # never the last channel
        keep[channel] = 0
        if accuracy(keep) < floor:
            break
        pruned[channel] = True
    return pruned


def prune_head(model: nn.Module, pruned: torch.Tensor):
    """Zero the head's columns of the pruned channels and keep them zero while training
    (their gradient is masked; momentum and weight decay of a zero stay zero)."""
    keep = (~pruned).to(model.head.weight.dtype).to(model.head.weight.device)
    with torch.no_grad():
        model.head.weight.mul_(keep)
    return model.head.weight.register_hook(lambda grad: grad * keep)


class FP(PostTrainingRepair):
    name = "fp"
    Config = FPConfig
    main_epochs = "finetune.epochs"

    def repair_stages(self, model: nn.Module, clean: ImageSet, ctx: DefenseContext, timer: StageTimer) -> DefenseResult:
        cfg = self.config

        def prune() -> nn.Module:
            features = extract_features(model, clean.images, ctx.runtime)
            pruned_model = trainable_copy(model)
            self.pruned = choose_pruned(features, clean.labels, pruned_model.head, cfg.max_acc_drop)
            prune_head(pruned_model, self.pruned).remove()
            return pruned_model.eval()

        pruned_model = timer.run("prune", 0, prune)
        before = clean_accuracy(pruned_model, clean, ctx)
        handle = prune_head(pruned_model, self.pruned)
        tuned = timer.run("finetune", cfg.finetune.epochs,
                          lambda: fine_tune(pruned_model, clean, cfg.finetune, ctx, "finetune", copy=False))
        handle.remove()
        n_pruned, n_channels = int(self.pruned.sum()), len(self.pruned)
        return DefenseResult(tuned, stages=timer.records, notes=[
            f"pruned {n_pruned} of {n_channels} last-layer channels ({n_pruned / n_channels:.0%}; rule: the most "
            f"whose removal keeps clean-reference accuracy within {cfg.max_acc_drop:g} of the unpruned model's; "
            f"{before:.4f} after pruning), then fine-tuned {cfg.finetune.epochs} epochs; last epoch returned"])
