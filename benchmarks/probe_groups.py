"""What quarantine's probe sets aside, label by label: for each attack, the share of each label
in the probe's top `--fraction` against its share of the whole set, and how much of the
poison is in it. Run it to see which signal separates a clean-label attack (SIG, LC: the
poison keeps its true label, so the verdict agrees with it) from a clean set.

    PYTHONPATH=src python benchmarks/probe_groups.py --attacks none sig badnets --out /tmp/probe

Each attack's probe (quick profile, seed 0) is the SL model `unpoison run` would train for
it, taken from the shared model cache when one exists. Writes OUT/ATTACK.pt (scores,
features, labels, poison mask) and prints one table per attack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from unpoison import artifacts
from unpoison.attacks import build_attack
from unpoison.data import load_dataset
from unpoison.defenses.base import DefenseContext
from unpoison.detect.expand import ExpandConfig, SeedExpansion
from unpoison.runtime import Runtime, generator


def probe(attack_name: str, params: dict, root: str, out: Path, seed: int) -> dict:
    runtime = Runtime.create("cpu", "auto")
    train = load_dataset("cifar10", "train", root)
    attack = build_attack(attack_name, **params)
    ctx = DefenseContext(runtime, "quick", seed, "wrn16-1", out / attack_name, progress=False)
    ctx.shared_model = artifacts.ModelCache.for_context(ctx, train).shared_model
    attack.prepare(train, ctx)
    poisoned = attack.poison(train, generator(seed, "poison"))
    data = poisoned.untrusted()
    ctx.shared_model = artifacts.ModelCache.for_context(ctx, data).shared_model
    detection = SeedExpansion(ExpandConfig.for_profile("quick")).detect(data, ctx)
    record = {"scores": detection.scores, "features": detection.info["features"], "labels": data.labels,
              "is_poison": poisoned.is_poison, "classes": data.classes}
    torch.save(record, out / f"{attack_name}.pt")
    return record


def table(record: dict, fraction: float) -> str:
    scores, labels, poison = record["scores"], record["labels"], record["is_poison"]
    top = torch.zeros(len(labels), dtype=torch.bool)
    top[torch.argsort(scores, descending=True, stable=True)[: int(round(len(labels) * fraction))]] = True
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
                params[key] = float(value) if value.replace(".", "", 1).isdigit() else value
        path = args.out / f"{name}.pt"
        record = torch.load(path) if path.exists() else probe(name, params, root, args.out, args.seed)
        print(f"== {name} {params}\n{table(record, args.fraction)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
