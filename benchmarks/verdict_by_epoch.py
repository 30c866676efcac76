"""The quarantine's verdict at every epoch, for diagnosis: train a network's quick recipe on the
images a saved run kept (its scores.npz: the top `--fraction` are set aside) and, after every
epoch, print per label the quarantined images' contradiction and doubted shares against the
kept images' (the two group tests of defenses/verdict.py), and how much of the poison the model
still contradicts (the poison mask is read here, for the printout only; the defence never sees it).

    PYTHONPATH=src python benchmarks/verdict_by_epoch.py --attack blended --param rate=0.1 \\
        --scores runs/qq-blended/scores.npz --model quicknet-s --fraction 0.2 --epochs 5
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from unpoison.attacks import build_attack
from unpoison.context import DefenseContext
from unpoison.data import load_dataset
from unpoison.data.batches import batch_indices
from unpoison.defenses.verdict import doubted
from unpoison.profiles import model_recipe
from unpoison.runtime import Runtime, generator
from unpoison.train.engine import Engine
from unpoison.train.supervised import DeviceData, predict


def group_line(probs: torch.Tensor, labels: torch.Tensor, quarantined: torch.Tensor, num_classes: int) -> str:
    contradicted = probs.argmax(1) != labels
    given = probs.gather(1, labels[:, None]).squeeze(1)
    low = doubted(given, quarantined, labels, num_classes, 0.1)
    parts = []
    for c in range(num_classes):
        group, kept = quarantined & (labels == c), ~quarantined & (labels == c)
        n = int(group.sum())
        if n < 20:
            continue
        rates = [(float(s[group].float().mean()), float(s[kept].float().mean())) for s in (contradicted, low)]
        zs = [(r - b) / (max(b * (1 - b), 1e-4) / n) ** 0.5 for r, b in rates]
        parts.append(f"L{c} n{n} contradicted {rates[0][0]:.2f}/{rates[0][1]:.2f} z{zs[0]:.0f} "
                     f"doubted {rates[1][0]:.2f}/{rates[1][1]:.2f} z{zs[1]:.0f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", required=True)
    parser.add_argument("--param", action="append", default=[], help="attack parameter KEY=VALUE")
    parser.add_argument("--scores", required=True, help="a quarantine run's scores.npz")
    parser.add_argument("--model", default="wrn16-1")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--epochs", type=int, default=None,
                        help="stop after this many epochs (the schedule stays the full recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = {k: eval(v, {}) for k, v in (p.split("=", 1) for p in args.param)}
    runtime = Runtime.create("cpu", "auto")
    train = load_dataset("cifar10", "train", os.environ["UNPOISON_DATA"])
    poisoned = build_attack(args.attack, **params).poison(train, generator(args.seed, "poison"))
    data = poisoned.untrusted()
    saved = np.load(args.scores)
    suspicion = torch.tensor(saved["scores"]).float()
    rank = torch.where(suspicion > 1.5, suspicion - 2, suspicion)   # undo the +2 of unlearned images
    quarantined = torch.zeros(len(data), dtype=torch.bool)
    quarantined[torch.argsort(rank, descending=True, stable=True)[: int(round(len(data) * args.fraction))]] = True
    poison = poisoned.is_poison
    print(f"poison set aside {int((quarantined & poison).sum())}, kept {int((~quarantined & poison).sum())}", flush=True)

    ctx = DefenseContext(runtime, "quick", args.seed, args.model, Path("/tmp/verdict-by-epoch"), progress=False)
    recipe = model_recipe("quick", args.model)
    kept = (~quarantined).nonzero().flatten()
    engine = Engine(ctx.new_model(data), recipe.optim, runtime, name="kept", epochs=recipe.epochs,
                    steps_per_epoch=-(-len(kept) // recipe.batch_size), seed=args.seed, ema_decay=recipe.ema_decay,
                    progress=False)
    device_data = DeviceData(data, runtime)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        def loss_fn(batch: torch.Tensor) -> torch.Tensor:
            x, y = device_data.batch(kept[batch], recipe.augment, g)
            return F.cross_entropy(engine.model(x), y, label_smoothing=recipe.label_smoothing)

        engine.run_pass(list(batch_indices(len(kept), recipe.batch_size, g)), loss_fn)
        probs = torch.softmax(predict(engine.eval_model, data.images, runtime).float(), 1)
        still = (probs.argmax(1) != data.labels)
        print(f"after epoch {epoch + 1}: {group_line(probs, data.labels, quarantined, data.num_classes)} | poison "
              f"contradicted: set aside {float(still[quarantined & poison].float().mean()):.2f}, "
              f"kept {float(still[~quarantined & poison].float().mean()):.2f}", flush=True)
        if args.epochs and epoch + 1 >= args.epochs:
            raise SystemExit(0)
        return {}

    engine.fit(epoch_fn)


if __name__ == "__main__":
    main()
