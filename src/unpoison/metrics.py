"""The field's standard measurements.

CA: accuracy on the clean test set. ASR: over test images whose true label is not the
target, with the trigger applied, the fraction classified as the target. RA: accuracy on
those triggered images against their true labels. DER (BackdoorBench): how much of the
backdoor a defence removed, net of the clean accuracy it cost. Detection metrics score
per-sample suspicion (higher = more likely poisoned) against the ground truth.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attacks.base import Attack
from .data.imageset import ImageSet
from .runtime import Runtime
from .train.supervised import predict


def accuracy(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    pred = logits_or_pred.argmax(1) if logits_or_pred.dim() == 2 else logits_or_pred
    return float((pred.cpu() == labels.cpu()).float().mean())


def backdoor_metrics(model: nn.Module, test: ImageSet, attack: Attack, runtime: Runtime,
                     backdoor=None, tta: bool = False) -> dict[str, float | None]:
    """CA, ASR and RA of `model` (with test-time augmentation when `tta`, for all three).
    ASR and RA are None for the clean baseline (no trigger)."""
    result: dict[str, float | None] = {"clean_acc": accuracy(predict(model, test.images, runtime, tta=tta),
                                                             test.labels)}
    if attack.name == "none":
        result.update(asr=None, robust_acc=None)
        return result
    backdoor = backdoor or attack.backdoor_test(test)
    logits = predict(model, backdoor.images, runtime, tta=tta)
    result["asr"] = accuracy(logits, backdoor.target_labels)
    result["robust_acc"] = accuracy(logits, backdoor.true_labels)
    return result


def defense_effectiveness_rating(ca_backdoored: float, asr_backdoored: float, ca_defended: float,
                                 asr_defended: float) -> float:
    """DER = (max(0, dASR) - max(0, dCA) + 1) / 2, in [0, 1]; 1 removes the backdoor at no cost."""
    return (max(0.0, asr_backdoored - asr_defended) - max(0.0, ca_backdoored - ca_defended) + 1) / 2


def detection_metrics(scores: torch.Tensor, is_poison: torch.Tensor, flagged: torch.Tensor | None = None,
                      trusted: torch.Tensor | None = None, fpr: float = 0.05) -> dict[str, float | int | None]:
    """AUROC and TPR at `fpr` of continuous scores; precision/recall of the flagged set;
    and how many poisoned samples slipped into the set the defence trusted as clean (each
    of them teaches the backdoor again with its label)."""
    scores = scores.detach().double().cpu()
    truth = is_poison.bool().cpu()
    out: dict[str, float | int | None] = {"auroc": None, "tpr_at_fpr_5": None, "recall_at_10_percent": None,
                                          "precision": None, "recall": None, "n_flagged": None}
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos and n_neg:
        from sklearn.metrics import roc_auc_score, roc_curve

        finite = torch.nan_to_num(scores, nan=-math.inf, posinf=1e300, neginf=-1e300)
        out["auroc"] = float(roc_auc_score(truth.numpy(), finite.numpy()))
        false_pos, true_pos, _ = roc_curve(truth.numpy(), finite.numpy())
        out["tpr_at_fpr_5"] = float(true_pos[false_pos <= fpr].max()) if (false_pos <= fpr).any() else 0.0
        out["recall_at_10_percent"] = recall_at_fraction(finite, truth, 0.1)
    if flagged is not None:
        flagged = flagged.bool().cpu()
        hits = int((flagged & truth).sum())
        out["n_flagged"] = int(flagged.sum())
        out["precision"] = hits / out["n_flagged"] if out["n_flagged"] else None
        out["recall"] = hits / n_pos if n_pos else None
    if trusted is not None:
        trusted = trusted.bool().cpu()
        out["n_trusted"] = int(trusted.sum())
        out["n_trusted_poisoned"] = int((trusted & truth).sum())
    return out


def recall_at_fraction(scores: torch.Tensor, is_poison: torch.Tensor, fraction: float) -> float:
    """Share of the poisoned samples among the `fraction` highest-scored (a fixed budget of
    images to inspect or drop, the same for every detector; ties broken by index)."""
    k = int(round(fraction * len(scores)))
    top = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return float(is_poison.bool()[top].sum()) / max(int(is_poison.sum()), 1)


def subset_accuracy(model: nn.Module, data: ImageSet, is_poison: torch.Tensor, runtime: Runtime) -> dict[str, float]:
    """Training accuracy (against the given, possibly poisoned, labels) on the poisoned and
    clean subsets separately: the DLP paper's Figure 1."""
    logits = predict(model, data.images, runtime)
    pred = logits.argmax(1)
    correct = (pred == data.labels).float()
    out = {"train_acc_clean": float(correct[~is_poison].mean()) if (~is_poison).any() else float("nan")}
    out["train_acc_poison"] = float(correct[is_poison].mean()) if is_poison.any() else float("nan")
    return out
