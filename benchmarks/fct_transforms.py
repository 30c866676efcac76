"""FCT's detection AUROC for each transformation, on one trained SD model.

    UNPOISON_DATA=../shared/datasets python benchmarks/fct_transforms.py \\
        --attack blended --sd ~/.cache/unpoison/models/KEY.pt [--poisoned 1000 --clean 3000]

The SD model is a cache entry (its KEY is in `reused_models` of a D-ST run, which reuses the
SD model its D-BR run trained). Scores a random subset of the poisoned training set (the same
poisoning as `unpoison run --attack A --seed 0`) with every transformation in
`augment.TRANSFORMS` through the detector's own `fct_scores`, and with the mean of their per-sample ranks, and prints the AUROCs.
Attacks that need a reference model (TrojanNN, LC) are not supported here.
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

import torch
from sklearn.metrics import roc_auc_score

from unpoison.attacks import build_attack
from unpoison.data import augment, load_dataset
from unpoison.detect.fct import fct_scores
from unpoison.runtime import Runtime, generator

from per_class_accuracy import load_cached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", required=True)
    parser.add_argument("--sd", required=True, help="the SD model's cache entry")
    parser.add_argument("--model", default="wrn16-1")
    parser.add_argument("--poisoned", type=int, default=1000)
    parser.add_argument("--clean", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    runtime = Runtime.create(args.device)
    train = load_dataset("cifar10", "train")
    attack = build_attack(args.attack)
    poisoned = attack.poison(train, generator(args.seed, "poison"))
    data, is_poison = poisoned.untrusted(), poisoned.is_poison
    g = generator(args.seed, "fct-transforms", "subset")
    pick = lambda idx, n: idx[torch.randperm(len(idx), generator=g)[:n]]
    index = torch.cat([pick(torch.nonzero(is_poison).flatten(), args.poisoned),
                       pick(torch.nonzero(~is_poison).flatten(), args.clean)])
    truth = is_poison[index].numpy()
    model = runtime.prepare_model(load_cached(args.sd, args.model, train.num_classes)).eval()
    subset = data.subset(index)
    context = SimpleNamespace(runtime=runtime, seed=args.seed)   # all fct_scores reads of a run's context
    auroc, ranks = {}, []
    for name in augment.TRANSFORMS:
        scores = fct_scores(model, subset, context, transform=name)
        auroc[name] = round(float(roc_auc_score(truth, scores.numpy())), 4)
        ranks.append(scores.argsort().argsort().float())
    auroc["mean_rank_of_all"] = round(float(roc_auc_score(truth, torch.stack(ranks).mean(0).numpy())), 4)
    print(json.dumps({"attack": args.attack, "auroc": auroc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
