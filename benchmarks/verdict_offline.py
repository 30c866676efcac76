"""Judge a saved quarantine run again with other settings, and count, against the poison
mask, what each choice would unlearn, train on and leave out. For diagnosis only: the
defence never reads the mask; this script does, to say what a rule change would have done.

It rebuilds the run's poisoned set (same attack, seed), takes the probe from the run's model
cache (the SL model; its features and scores are recomputed, deterministic), reads the
verdict (and second look) from the run's checkpoint `checkpoints/train.pt`, and calls
`verdict.judge` with the run's settings changed by `--set KEY=VALUE`.

    PYTHONPATH=src python benchmarks/verdict_offline.py RUN_DIR --attack badnets --seed 1 \
        --set release_unlike=0.05 --set alike_quantile=0.05
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch

from unpoison.artifacts import ModelCache
from unpoison.attacks import build_attack
from unpoison.context import DefenseContext
from unpoison.data import load_dataset
from unpoison.defenses.quarantine import QuarantineConfig
from unpoison.defenses.verdict import Verdict, judge
from unpoison.detect.expand import SeedExpansion
from unpoison.runtime import Runtime, generator


def counts(name: str, mask: torch.Tensor, poison: torch.Tensor, labels: torch.Tensor, target: int) -> str:
    clean = mask & ~poison
    return (f"{name:>10}: {int(mask.sum()):6d}  poison {int((mask & poison).sum()):5d}  clean {int(clean.sum()):5d}"
            f"  (clean of the target label {int((clean & (labels == target)).sum()):5d})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--param", action="append", default=[], help="attack parameter KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="wrn16-1")
    parser.add_argument("--set", action="append", default=[], help="quarantine setting KEY=VALUE (top level)")
    args = parser.parse_args()
    runtime = Runtime.create("cpu", "auto")
    train = load_dataset(args.dataset, "train", os.environ["UNPOISON_DATA"])
    attack = build_attack(args.attack, **{k: eval(v, {}) for k, v in (p.split("=", 1) for p in args.param)})
    poisoned = attack.poison(train, generator(args.seed, "poison"))
    data, poison = poisoned.untrusted(), poisoned.is_poison
    ctx = DefenseContext(runtime, "quick", args.seed, args.model, "/tmp/verdict-offline", progress=False)
    ctx.shared_model = ModelCache.for_context(ctx, data).shared_model
    base = QuarantineConfig.for_profile("quick")
    detection = SeedExpansion(base.probe).detect(data, ctx)
    features = detection.info["features"]
    state = torch.load(os.path.join(args.run, "checkpoints", "train.pt"), weights_only=True)["extra"]
    verdict, second = Verdict(), Verdict()
    verdict.load_state_dict(state["verdict"])
    if state["second_look"]["predicted"] is not None:
        second.load_state_dict(state["second_look"])
    target = int(getattr(attack, "target", 0) or 0)
    for setting in [""] + args.set:
        changes = dict(p.split("=", 1) for p in setting.split(";") if p)
        cfg = replace(base, **{k: eval(v, {}) for k, v in changes.items()})
        quarantined = torch.zeros(len(data), dtype=torch.bool)
        quarantined[torch.argsort(detection.scores, descending=True, stable=True)[
            : int(round(len(data) * cfg.quarantine_fraction))]] = True
        train_mask, unlearn, groups = judge(verdict, data.labels, quarantined, data.num_classes, cfg,
                                            second if second.ready else None, features)
        print(f"== {setting or 'run settings'}")
        print(counts("set aside", quarantined, poison, data.labels, target))
        print(counts("unlearned", unlearn, poison, data.labels, target))
        print(counts("trained", train_mask, poison, data.labels, target))
        print(counts("left out", ~train_mask & ~unlearn, poison, data.labels, target))
        for group in groups:
            if group["unlearned"]:
                print("   group", group)


if __name__ == "__main__":
    main()
