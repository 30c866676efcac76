"""What quarantine's probe sets aside, label by label: for each attack, the share of each label
in the probe's top `--fraction` against its share of the whole set, and how much of the
poison is in it. Run it to see which signal separates a clean-label attack (SIG, LC: the
poison keeps its true label, so the verdict agrees with it) from a clean set.

    PYTHONPATH=src python benchmarks/probe_groups.py --attacks none sig badnets --out /tmp/probe
    # with the verdict of a finished quarantine run of a cell:
    PYTHONPATH=src python benchmarks/probe_groups.py --attacks sig --param sig:rate=0.05 \
        --verdict sig=runs/sig-quarantine --out /tmp/probe

Each attack's probe (quick profile, seed 0) is the SL model `unpoison run` would train for
it, taken from the shared model cache when one exists. Writes OUT/ATTACK.pt (scores,
features, labels, poison mask) and prints one table per attack.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch

from unpoison import artifacts
from unpoison.attacks import build_attack
from unpoison.data import load_dataset
from unpoison.defenses.base import DefenseContext
from unpoison.detect.expand import ExpandConfig, SeedExpansion
from unpoison.runtime import Runtime, generator


def poisoned_set(attack_name: str, params: dict, root: str, out: Path, seed: int):
    """(untrusted set, poison mask, context) as `unpoison run` builds them, with the shared model
    cache, so the probe trained here and by a run of the same cell is one model."""
    runtime = Runtime.create("cpu", "auto")
    train = load_dataset("cifar10", "train", root)
    attack = build_attack(attack_name, **params)
    ctx = DefenseContext(runtime, "quick", seed, "wrn16-1", out / attack_name, progress=False)
    ctx.shared_model = artifacts.ModelCache.for_context(ctx, train).shared_model
    attack.prepare(train, ctx)
    poisoned = attack.poison(train, generator(seed, "poison"))
    data = poisoned.untrusted()
    ctx.shared_model = artifacts.ModelCache.for_context(ctx, data).shared_model
    return data, poisoned.is_poison, ctx


def probe(attack_name: str, params: dict, root: str, out: Path, seed: int) -> dict:
    data, is_poison, ctx = poisoned_set(attack_name, params, root, out, seed)
    detection = SeedExpansion(ExpandConfig.for_profile("quick")).detect(data, ctx)
    record = {"scores": detection.scores, "features": detection.info["features"], "labels": data.labels,
              "is_poison": is_poison, "classes": data.classes}
    torch.save(record, out / f"{attack_name}.pt")
    return record


def set_aside(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    top = torch.zeros(len(scores), dtype=torch.bool)
    top[torch.argsort(scores, descending=True, stable=True)[: int(round(len(scores) * fraction))]] = True
    return top


def verdict_table(record: dict, checkpoint: Path, fraction: float) -> str:
    """The verdict a quarantine run took (its train checkpoint) on the set-aside images of each
    label against the kept ones: contradiction rates, median given-label probability, and the
    chance that a set-aside image gets a lower probability than a kept one (for the poison too)."""
    verdict = torch.load(checkpoint, weights_only=False)["extra"]["verdict"]
    prob, predicted = verdict["given_prob"].float(), verdict["predicted"]
    labels, poison = record["labels"], record["is_poison"]
    top = set_aside(record["scores"], fraction)

    def lower(a: torch.Tensor, b: torch.Tensor) -> float:   # P(a < b), ties half
        a, b = a[:, None], b[None, :]
        return float(((a < b).float() + 0.5 * (a == b).float()).mean()) if a.numel() and b.numel() else float("nan")

    lines = ["label  set-aside  poison  contradicted(aside/kept)  median p(aside/kept)  P(aside<kept)  P(poison<kept)"]
    for c in range(len(record["classes"])):
        aside, kept = top & (labels == c), ~top & (labels == c)
        if not aside.any():
            continue
        sample = prob[kept][torch.randperm(int(kept.sum()), generator=torch.Generator().manual_seed(0))[:2000]]
        lines.append(f"{c:5d} {int(aside.sum()):10d} {int((aside & poison).sum()):7d} "
                     f"{float((predicted[aside] != c).float().mean()):11.3f} / {float((predicted[kept] != c).float().mean()):.3f}"
                     f" {float(prob[aside].median()):14.3f} / {float(prob[kept].median()):.3f}"
                     f" {lower(prob[aside], sample):13.3f} {lower(prob[aside & poison], sample):15.3f}")
    return "\n".join(lines)


def table(record: dict, fraction: float) -> str:
    scores, labels, poison = record["scores"], record["labels"], record["is_poison"]
    top = set_aside(scores, fraction)
    lines = [f"{'label':>12} {'share of set':>12} {'share of top':>12} {'ratio':>6} {'poison in top':>13}"]
    for c, name in enumerate(record["classes"]):
        in_set = float((labels == c).float().mean())
        in_top = float((labels[top] == c).float().mean())
        lines.append(f"{name:>12} {in_set:12.3f} {in_top:12.3f} {in_top / max(in_set, 1e-9):6.2f} "
                     f"{int((top & poison & (labels == c)).sum()):13d}")
    lines.append(f"poison: {int(poison.sum())}, in top: {int((top & poison).sum())}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="+", default=["none", "sig", "badnets"])
    parser.add_argument("--param", action="append", default=[], metavar="ATTACK:KEY=VALUE",
                        help="an attack parameter, e.g. sig:rate=0.05")
    parser.add_argument("--fraction", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="dataset root (default: $UNPOISON_DATA)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--verdict", action="append", default=[], metavar="ATTACK=RUN_DIR",
                        help="also print the verdict of a quarantine run of that cell (RUN_DIR/checkpoints/train.pt)")
    args = parser.parse_args()
    import os
    root = args.data or os.environ.get("UNPOISON_DATA")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.attacks:
        params = {}
        for item in args.param:
            attack, setting = item.split(":", 1)
            if attack == name:
                key, value = setting.split("=", 1)
                params[key] = ast.literal_eval(value) if value[:1].isdigit() else value
        path = args.out / f"{name}.pt"
        record = torch.load(path) if path.exists() else probe(name, params, root, args.out, args.seed)
        print(f"== {name} {params}\n{table(record, args.fraction)}", flush=True)
        for item in args.verdict:
            attack, run_dir = item.split("=", 1)
            if attack == name:
                print(verdict_table(record, Path(run_dir) / "checkpoints" / "train.pt", args.fraction), flush=True)


if __name__ == "__main__":
    sys.exit(main())
