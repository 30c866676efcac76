"""Does a backdoor the probe misses show up later, in the model in training? For diagnosis:
train a network's quick recipe on the whole poisoned set (no defence) and, after every epoch,
print the ASR, and seed expansion run on *that epoch's* model (its 1 % lowest-entropy images as
seeds, every image scored by closeness to them in its features): how much of the poison the top
`--fraction` holds, and whether a label group of that top stands out by the verdict test of
defenses/verdict.py (doubted share) read from each epoch's probabilities so far: a verdict
taken before the trigger was learned doubts the poison. The poison mask is read for the
printout only.

    PYTHONPATH=src python benchmarks/late_probe.py --attack blended --param rate=0.01 --epochs 8
"""

from __future__ import annotations

import argparse
import os

import torch

from unpoison.attacks import build_attack
from unpoison.context import DefenseContext
from unpoison.data import load_dataset
from unpoison.detect.entropy import prediction_entropy
from unpoison.detect.expand import seed_similarity
from unpoison.defenses.verdict import doubted
from unpoison.metrics import backdoor_metrics
from unpoison.profiles import model_recipe
from unpoison.runtime import Runtime, generator
from unpoison.train.engine import Engine
from unpoison.train.supervised import DeviceData, extract_features, predict, supervised_epoch


def group_test(given: torch.Tensor, labels: torch.Tensor, top: torch.Tensor, num_classes: int) -> list[tuple]:
    """(label, size, doubted share, kept share, z, excess) of every label group of `top`."""
    low = doubted(given, top, labels, num_classes, 0.1)
    rows = []
    for c in range(num_classes):
        group, kept = top & (labels == c), ~top & (labels == c)
        n = int(group.sum())
        if n == 0 or not kept.any():
            continue
        rate, base = float(low[group].float().mean()), float(low[kept].float().mean())
        z = (rate - base) / (max(base * (1 - base), 1e-4) / n) ** 0.5
        rows.append((c, n, rate, base, z, (rate - base) * n))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--attack", required=True)
    parser.add_argument("--param", action="append", default=[], help="attack parameter KEY=VALUE")
    parser.add_argument("--model", default="wrn16-1")
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=None, help="stop after this many epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=None, help="train on this many images (a quick check)")
    args = parser.parse_args()
    params = {k: eval(v, {}) for k, v in (p.split("=", 1) for p in args.param)}
    runtime = Runtime.create("cpu", "auto")
    root = os.environ["UNPOISON_DATA"]
    train, test = load_dataset(args.dataset, "train", root), load_dataset(args.dataset, "test", root)
    if args.subset:
        train, test = train.head(args.subset, generator(args.seed, "subset")), test.head(1000, generator(args.seed, "t"))
    attack = build_attack(args.attack, **params)
    poisoned = attack.poison(train, generator(args.seed, "poison"))
    data, poison = poisoned.untrusted(), poisoned.is_poison
    backdoor = attack.backdoor_test(test)
    ctx = DefenseContext(runtime, "quick", args.seed, args.model, "/tmp/late-probe", progress=False)
    recipe = model_recipe("quick", args.model)
    engine = Engine(ctx.new_model(data), recipe.optim, runtime, name="plain", epochs=recipe.epochs,
                    steps_per_epoch=-(-len(data) // recipe.batch_size), seed=args.seed,
                    ema_decay=recipe.ema_decay, progress=False)
    device_data = DeviceData(data, runtime)
    n_top = int(round(len(data) * args.fraction))
    verdict: list[torch.Tensor] = []

    train_pass = supervised_epoch(device_data, recipe.batch_size, recipe.augment, recipe.label_smoothing)

    def epoch_fn(engine: Engine, epoch: int, g: torch.Generator) -> dict:
        train_pass(engine, epoch, g)
        model = engine.eval_model.eval()
        logits = predict(model, data.images, runtime).float()
        given = torch.softmax(logits, 1).gather(1, data.labels[:, None]).squeeze(1)
        verdict.append(given)
        seeds = torch.argsort(prediction_entropy(logits), stable=True)[: max(2, len(data) // 100)]
        scores = seed_similarity(extract_features(model, data.images, runtime), seeds, 10)
        top = torch.zeros(len(data), dtype=torch.bool)
        top[torch.argsort(scores, descending=True, stable=True)[:n_top]] = True
        asr = backdoor_metrics(model, test, attack, runtime, backdoor)["asr"]
        line = (f"epoch {epoch + 1}: ASR {asr:.3f} | seeds poison {float(poison[seeds].float().mean()):.2f} | "
                f"top {args.fraction:.0%} holds {int((top & poison).sum())}/{int(poison.sum())} poison")
        print(line, flush=True)
        for at, earlier in enumerate(verdict, start=1):   # this epoch's top, judged by every epoch's verdict
            rows = sorted(group_test(earlier, data.labels, top, data.num_classes), key=lambda r: -r[5])[:2]
            print(f"    by the epoch-{at} verdict: " + "; ".join(
                f"L{c} n{n} doubted {r:.2f}/{b:.2f} z{z:.0f} x{x:.0f}" for c, n, r, b, z, x in rows), flush=True)
        if args.epochs and epoch + 1 >= args.epochs:
            raise SystemExit(0)
        return {}

    engine.fit(epoch_fn)


if __name__ == "__main__":
    main()
