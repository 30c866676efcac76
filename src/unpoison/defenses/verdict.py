"""The verdict of the model in training on a quarantine, and what quarantine decides from it
(defenses/quarantine.py is the method; this is its judgement, kept apart to keep both short).

`Verdict`: the early model's predicted class and given-label probability for every image.
`contradicted_groups` and `doubted`: which label groups of the quarantine hold poison. `judge`: which
images to train on and which to unlearn from the verdict on. `LateLook`: the same judgement,
later in training, of the model in training's own suspects. `late_learned` and `repair_late`:
the optional recheck after training and its repair.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..detect.entropy import prediction_entropy
from ..detect.expand import seed_similarity
from ..runtime import generator
from ..train.supervised import DeviceData, extract_features, predict
from ..train.unlearn import suspected_accuracy, unlearn
from .base import DefenseContext

MIN_REPAIR = 20      # a late set smaller than this is noise, not a backdoor worth an ascent

if TYPE_CHECKING:
    from .quarantine import QuarantineConfig


class Verdict:
    """The early model's view of every training image: its predicted class and the
    probability it gives the given label. Saved with the training checkpoint."""

    def __init__(self) -> None:
        self.predicted: torch.Tensor | None = None
        self.given_prob: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.predicted is not None

    def take(self, model: nn.Module, data: ImageSet, runtime) -> None:
        probs = torch.softmax(predict(model, data.images, runtime), dim=1)
        self.predicted = probs.argmax(1)
        self.given_prob = probs.gather(1, data.labels[:, None]).squeeze(1)

    def state_dict(self) -> dict:
        return {"predicted": self.predicted, "given_prob": self.given_prob}

    def load_state_dict(self, state: dict) -> None:
        self.predicted, self.given_prob = state["predicted"], state["given_prob"]


def contradicted_groups(contradicted: torch.Tensor, quarantined: torch.Tensor, labels: torch.Tensor,
                        num_classes: int, z: float | None = 3.0, min_excess: float = 0.0,
                        signal: torch.Tensor | None = None,
                        confirm: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """Which quarantined images to unlearn (bool mask) and the per-label table behind it.

    A quarantined image the early model contradicts is either poison (its trigger not yet
    learned) or a clean image that is hard or mislabelled. The kept images of the same label
    say how often the second happens; a label group whose quarantined images carry the
    `signal` (default: contradicted; see `doubted`) more often than its kept images do, by `z`
    standard errors, holds poison, and its images that are contradicted and carry the signal
    are unlearned (the known poison of the group). The quarantine is
    not a random draw of its labels (the probe picks images that look alike, often easy ones),
    so a clean group can pass the z-test; it must also hold at least `min_excess` (a share of
    the whole set) more such images than the kept rate explains: the estimated number of
    poisoned images in it. With `confirm` and a `signal` other than contradiction, the group's
    quarantined images must not be contradicted less often than its kept images by `z` standard
    errors (not "more often": a patch on a label the model gets half wrong part-way through
    training moves the contradiction rate only a few points, which is why `signal` is used): poison
    is contradicted, while a clean group the model has not seen can get
    less probability than the kept images for another reason (on GTSRB, whose images come in
    tracks of near-copies, a set-aside track is unseen while every kept track is nearly
    memorised). z=None unlearns every contradicted quarantined image."""
    signal = contradicted if signal is None else signal
    unlearn = torch.zeros_like(quarantined)
    table = []
    for c in range(num_classes):
        group = quarantined & (labels == c)
        if not group.any():
            continue
        kept = ~quarantined & (labels == c)
        base = float(signal[kept].float().mean()) if kept.any() else 0.0
        rate = float(signal[group].float().mean())
        spread = (max(base * (1 - base), 1e-4) / int(group.sum())) ** 0.5
        excess = (rate - base) * int(group.sum())
        chosen = z is None or (rate > base + z * spread and excess >= min_excess * len(labels))
        error = float(contradicted[kept].float().mean()) if kept.any() else 0.0
        contradicted_rate = float(contradicted[group].float().mean())
        if chosen and confirm and z is not None and signal is not contradicted:
            chosen = contradicted_rate >= error - z * (max(error * (1 - error), 1e-4) / int(group.sum())) ** 0.5
        if chosen:   # with the doubted signal, only the surely contradicted: a clean image the
            unlearn |= group & contradicted & signal   # model half-believes would widen the alike bar
        table.append({"label": c, "quarantined": int(group.sum()), "rate": round(rate, 4), "kept_rate": round(base, 4),
                      "contradicted_rate": round(contradicted_rate, 4),
                      "kept_error": round(error, 4), "excess": round(excess, 1), "unlearned": chosen})
    return unlearn, table


def doubted(given_prob: torch.Tensor, quarantined: torch.Tensor, labels: torch.Tensor, num_classes: int,
            quantile: float) -> torch.Tensor:
    """Images given less probability for their label than the `quantile` of the kept images of
    that label get (ties counted half, so a block of equal probabilities is neither all in nor
    all out): about `quantile` of the kept images, and of a clean quarantined group (which the
    probe fills with easy images) fewer; of a poisoned group, whose trigger the model has not
    learned, most of the poison. Unlike contradiction it does not depend on how many kept images
    the model in training gets wrong, which part-way through a high-lr run swings from 10 % to
    80 % between labels and epochs and can hide a poisoned group's excess."""
    below = torch.zeros_like(quarantined)
    for c in range(num_classes):
        kept = ~quarantined & (labels == c)
        if not kept.any():
            continue
        of_label = labels == c
        reference, _ = torch.sort(given_prob[kept].float())
        values = given_prob[of_label].float().contiguous()
        lower = torch.searchsorted(reference, values, right=False)
        upper = torch.searchsorted(reference, values, right=True)
        below[of_label] = (lower + upper).float() / (2 * len(reference)) < quantile
    return below


def judge(verdict: Verdict, labels: torch.Tensor, quarantined: torch.Tensor, num_classes: int,
          cfg: QuarantineConfig, second: Verdict | None = None,
          features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """From the verdict on: (train mask, unlearn mask, per-label table).

    Unlearned: the contradicted quarantined images of the label groups that stand out
    (contradicted_groups), and the kept images of those labels that the early model
    contradicts as confidently as it contradicts the known poison of the group (the poison
    the probe missed: the early model has not learned its trigger either, so it gives the
    label the same near-zero probability). Trained on: the kept images not unlearned and, with
    `release`, the quarantined images the early model agrees with, of every label that did
    not stand out (a poisoned image whose trigger is not yet learned is contradicted, so it
    stays out). With a `second` look, later in training, the images of a standing-out label
    still trained on, contradicted at the first look and now past the same cut, are unlearned
    as well: missed poison the unlearning kept from being learned, while the clean images of
    the label have been learned by then.
    With the probe's `features`, the images of a standing-out label, kept or set aside, that
    lie as close to its known poison as the least close `alike_quantile` of the known poison
    itself are unlearned too, contradicted or not: the probe learned the trigger, so in its
    features the poison it ranked below the cut, and the set-aside poison the verdict model
    half-believes (contradicted but not doubted, or agreed with), still sit with the poison it
    caught, not with the clean images of the label. A set-aside image the verdict agrees with must
    lie closer still (`alike_agreed_quantile`): the label's easy clean images sit near its poison
    too, and unlearning a clean image is the one step that costs accuracy; the agreed alike images
    below that bar stay out of training. By the same features, with `release_unlike`, the quarantined images of
    a standing-out label that the early model agrees with and that lie farther from its known
    poison than all but `release_unlike` of the known poison go back into training: the easy clean images of the target class the
    probe set aside with the poison (an agreed poisoned image, its trigger learned, still sits
    with the poison and stays out)."""
    contradicted = verdict.predicted != labels
    signal = None
    if cfg.group_signal == "doubted":
        signal = doubted(verdict.given_prob.float(), quarantined, labels, num_classes, cfg.doubt_quantile)
    unlearn, groups = contradicted_groups(contradicted, quarantined, labels, num_classes, cfg.group_z,
                                          cfg.group_min_excess, signal, cfg.confirm_contradicted)
    held_labels = torch.zeros(num_classes, dtype=torch.bool)
    unlike = torch.zeros_like(quarantined)   # agreed quarantined images of a held label, far from its poison
    for group in groups:
        if not group["unlearned"]:
            continue
        c = group["label"]
        held_labels[c] = True
        known = unlearn & (labels == c)
        if features is not None and cfg.alike_quantile is not None and int(known.sum()) >= 2:
            closeness = seed_similarity(features, known.nonzero().flatten(), cfg.probe.neighbours)
            bar = torch.quantile(closeness[known], cfg.alike_quantile)
            agreed_bar = torch.quantile(closeness[known], cfg.alike_agreed_quantile)
            alike = (labels == c) & (closeness >= bar) & ~unlearn
            alike &= ~quarantined | contradicted | (closeness >= agreed_bar)   # the rest stay out
            unlearn |= alike
            group["kept_alike"], group["set_aside_alike"] = int((alike & ~quarantined).sum()), int((alike & quarantined).sum())
            if cfg.release_unlike is not None:
                far_bar = torch.quantile(closeness[known], cfg.release_unlike)
                far = quarantined & (labels == c) & ~contradicted & (closeness < far_bar)
                unlike |= far
                group["released_unlike"] = int(far.sum())
        if cfg.kept_quantile is None or not known.any():
            continue
        cut = torch.quantile(verdict.given_prob[known].float(), cfg.kept_quantile)
        caught = ~quarantined & (labels == c) & contradicted & (verdict.given_prob.float() <= cut) & ~unlearn
        unlearn |= caught
        group["cut"], group["kept_unlearned"] = round(float(cut), 4), int(caught.sum())
    released = quarantined & ~held_labels[labels] & ~contradicted if cfg.release else torch.zeros_like(quarantined)
    released |= unlike
    train = ~unlearn & (~quarantined | released)
    if second is not None and second.ready:
        for group in groups:
            if "cut" in group:
                later = (train & (labels == group["label"]) & contradicted & (second.predicted != labels)
                         & (second.given_prob.float() <= group["cut"]))
                unlearn, train = unlearn | later, train & ~later
                group["kept_unlearned_later"] = int(later.sum())
    return train, unlearn, groups


class LateLook:
    """What the late look decided (saved with the training checkpoint): the images it unlearns
    from then on, the images it takes out of training, and its per-label table."""

    def __init__(self) -> None:
        self.unlearn: torch.Tensor | None = None
        self.drop: torch.Tensor | None = None
        self.groups: list[dict] = []

    @property
    def ready(self) -> bool:
        return self.unlearn is not None

    def take(self, model: nn.Module, data: ImageSet, verdict: Verdict, cfg: QuarantineConfig, runtime) -> None:
        """Seed expansion on `model` (the model in training, which may by now have learned a
        trigger the probe's short run had not), its top `quarantine_fraction` judged by the
        `verdict`, taken before: a label group of that top the verdict doubted stands out
        exactly as in the first look, and what `judge` unlearns is unlearned from now on; the
        top's images of a standing-out label that it does not give back leave training. The
        top's images of every other label were trained on all along and stay."""
        logits = predict(model, data.images, runtime).float()
        seeds = torch.argsort(prediction_entropy(logits), stable=True)[
            : max(2, int(round(len(data) * cfg.probe.filter_rate)))]
        features = extract_features(model, data.images, runtime)
        scores = seed_similarity(features, seeds, cfg.probe.neighbours)
        top = torch.zeros(len(data), dtype=torch.bool)
        top[torch.argsort(scores, descending=True, stable=True)[: int(round(len(data) * cfg.quarantine_fraction))]] = True
        train, unlearn, groups = judge(verdict, data.labels, top, data.num_classes, cfg, None, features)
        held = torch.zeros(data.num_classes, dtype=torch.bool)
        held[[g["label"] for g in groups if g["unlearned"]]] = True
        self.unlearn, self.drop = unlearn, unlearn | (top & held[data.labels] & ~train)
        self.groups = groups

    def state_dict(self) -> dict:
        return {"unlearn": self.unlearn, "drop": self.drop, "groups": json.dumps(self.groups)}

    def load_state_dict(self, state: dict) -> None:
        self.unlearn, self.drop, self.groups = state["unlearn"], state["drop"], json.loads(state["groups"])


def late_learned(model: nn.Module, data: ImageSet, verdict: Verdict, quarantined: torch.Tensor,
                 ctx: DefenseContext, cfg: QuarantineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3: (late mask, recheck score). Late = images the final model fits that the early
    model contradicted, among the `recheck_fraction` whose final features lie closest to the
    most confidently contradicted of them (seed expansion again, seeded by disagreement)."""
    fitted = predict(model, data.images, ctx.runtime).argmax(1) == data.labels
    contradicted = verdict.predicted != data.labels
    candidates = fitted & contradicted & ~quarantined
    score = torch.zeros(len(data))
    n_seeds = min(int(candidates.sum()), max(2, int(round(len(data) * cfg.recheck_seed_fraction))))
    if n_seeds < 2:
        return torch.zeros(len(data), dtype=torch.bool), score
    candidate_index = candidates.nonzero().flatten()
    # most confidently contradicted first: the lowest probability the early model gave the label
    seeds = candidate_index[torch.argsort(verdict.given_prob[candidate_index], stable=True)[:n_seeds]]
    score = seed_similarity(extract_features(model, data.images, ctx.runtime), seeds, cfg.probe.neighbours)
    top = torch.zeros(len(data), dtype=torch.bool)
    top[torch.argsort(score, descending=True, stable=True)[: int(round(len(data) * cfg.recheck_fraction))]] = True
    return top & candidates, score


def repair_late(model: nn.Module, data: ImageSet, trained: torch.Tensor, late: torch.Tensor, ctx: DefenseContext,
                cfg: QuarantineConfig) -> tuple[nn.Module, bool]:
    """Quarantine's stage 4: D-BR's loop (train/unlearn.py), ascent on the late set, descent on a
    random share of the kept images trained on. Returns (model, undone): the input model when
    the repair cost the trusted images more than `repair_tolerance` of their accuracy."""
    g = generator(ctx.seed, "quarantine-trusted")
    pool = (trained & ~late).nonzero().flatten()
    trusted = torch.zeros(len(data), dtype=torch.bool)
    trusted[pool[torch.randperm(len(pool), generator=g)[: int(round(len(pool) * cfg.trusted_fraction))]]] = True
    trusted_images = data.subset(trusted.nonzero().flatten())
    trusted_set = DeviceData(trusted_images, ctx.runtime)
    repaired = unlearn(copy.deepcopy(model).requires_grad_(True), data.subset(late.nonzero().flatten()), cfg.repair,
                       ctx.runtime, trusted=trusted_images, name="repair", seed=ctx.seed,
                       checkpoint_dir=ctx.checkpoints(), log_path=ctx.log_path,
                       on_epoch_end=ctx.epoch_hook("repair"), progress=ctx.progress)
    before, after = suspected_accuracy(model, trusted_set), suspected_accuracy(repaired, trusted_set)
    if after < before - cfg.repair_tolerance:
        return model, True
    return repaired, False


def explain(cfg: QuarantineConfig, data: ImageSet, quarantined: torch.Tensor, plan: dict, late: torch.Tensor,
            repaired: bool, undone: bool) -> list[str]:
    """What quarantine did, in a user's words (the run's notes and `train`'s closing summary)."""
    names = data.classes if data.classes else [str(c) for c in range(data.num_classes)]
    n = len(data)
    unlearned, groups = plan["unlearn"], plan["groups"]
    notes = [f"set aside {int(quarantined.sum())} of {n} images ({quarantined.float().mean():.1%}) before training"]
    held = [g for g in groups if g["unlearned"]]
    if held:
        shown = ", ".join(f"'{names[g['label']]}' ({g['rate']:.0%} of {g['quarantined']}, against "
                          f"{g['kept_rate']:.0%} of the kept images)" for g in held)
        missed = sum(g.get("kept_alike", 0) + g.get("kept_unlearned", 0) + g.get("kept_unlearned_later", 0)
                     for g in held)
        if cfg.group_signal == "contradicted":
            why = f"the model in training contradicted the labels of the set-aside images of {shown}"
        else:
            why = (f"the model in training gave the set-aside images of {shown} less probability for their "
                   f"label than it gave {1 - cfg.doubt_quantile:.0%} of that label's kept images")
        notes.append(f"{why}: {int((unlearned & quarantined).sum())} of those images, and {missed} kept "
                     f"images of the same label that looked like them to the probe or that it contradicted as "
                     f"surely, were unlearned (a label the images do not support is what a planted trigger "
                     f"teaches)")
    late_held = [g for g in plan.get("late_groups", []) if g["unlearned"]]
    if late_held:
        shown = ", ".join(f"'{names[g['label']]}' ({g['rate']:.0%} of {g['quarantined']}, against "
                          f"{g['kept_rate']:.0%} of the rest)" for g in late_held)
        notes.append(f"later in training, the model's own most suspicious images of {shown} were ones the check had "
                     f"doubted: {plan['late_unlearned']} of them were unlearned from then on (a backdoor learned "
                     f"after the check)")
    elif not held:
        notes.append("no label among the set-aside images stood out: the model in training doubted their labels "
                     "no more often than those of the kept images of their class, so nothing was unlearned")
    released = int((quarantined & plan["train"]).sum())
    if released:
        notes.append(f"{released} set-aside images whose labels the model in training agreed with went back "
                     f"into training after the check")
    held_out = int((~plan["train"] & ~unlearned).sum())
    if held_out:
        notes.append(f"{held_out} set-aside images were left out of training (contradicted, or of a label "
                     f"that stood out)")
    if repaired:
        notes.append(f"after training, {int(late.sum())} images learned late and unlike what the early model saw "
                     f"were unlearned in a short repair")
    elif undone:
        notes.append(f"after training, {int(late.sum())} images looked learned late, but unlearning them cost "
                     f"the model accuracy on images it trusts: the repair was undone (they were clean)")
    elif late.any():
        notes.append(f"after training, {int(late.sum())} images looked learned late: too few to repair "
                     f"(fewer than {MIN_REPAIR} images or {cfg.repair_min_fraction:.1%} of the set)")
    return notes
