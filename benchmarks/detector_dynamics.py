"""How the entropy ranking and seed expansion behave during a short SL run (how `expand` was found).

Trains DLP's quick SL recipe (WRN-16-1, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 128, no
augmentation, fp32) on the train/ split of a poisoned ImageFolder written by `unpoison poison`,
and at the listed steps scores every training image three ways:

  entropy   -H(softmax), DLP's filter score (the `entropy` detector);
  centroid  cosine to the mean of the 1 % lowest-entropy seeds (centred, normalised features);
  knn       mean cosine to the 10 nearest seeds (the `expand` detector).

Prints AUROC and the recall of the poisoned images in the top 10 % for each, reading the
manifest's ground truth (which nothing being measured sees).

    python benchmarks/detector_dynamics.py runs/user-blended/poisoned --steps 200,391,586,782
    python benchmarks/detector_dynamics.py runs/user-badnets/poisoned --epochs 3 --schedule cosine
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unpoison.data import augment
from unpoison.detect.entropy import prediction_entropy
from unpoison.detect.expand import seed_similarity
from unpoison.metrics import detection_metrics
from unpoison.models import build_model
from unpoison.runtime import Runtime
from unpoison.train.supervised import extract_features, predict
from unpoison.data.untrusted import load_folder


def recall_at(scores: torch.Tensor, truth: torch.Tensor, fraction: float = 0.1) -> float:
    top = scores.argsort(descending=True)[:int(fraction * len(scores))]
    return float(truth[top].sum()) / max(1, int(truth.sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("poisoned", type=Path, help="folder written by `unpoison poison` (train/ and manifest.json)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", default="", help="comma-separated steps to score at (default: every epoch end)")
    p.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use the first N training images (a quick check)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    runtime = Runtime.create("cpu", "fp32")
    data = load_folder(args.poisoned, "train", (32, 32))
    if args.limit:
        data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:args.limit])
    manifest = json.loads((args.poisoned / "manifest.json").read_text())
    poisoned_files = {entry["file"] for entry in manifest["poisoned"]}
    truth = torch.tensor([path in poisoned_files for path in data.paths])

    model = runtime.prepare_model(build_model("wrn16-1", data.num_classes))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    batch, steps_per_epoch = 128, math.ceil(len(data) / 128)
    total = args.epochs * steps_per_epoch
    checks = {int(s) for s in args.steps.split(",") if s} or {e * steps_per_epoch for e in range(1, args.epochs + 1)}
    # a bare loop rather than the Engine: the point is to score at arbitrary steps inside an
    # epoch, and the Engine's hooks fire at epoch ends only
    order = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.time()
    for _ in range(args.epochs):
        permutation = torch.randperm(len(data), generator=order)
        for i in range(steps_per_epoch):
            index = permutation[i * batch:(i + 1) * batch]
            model.train()
            x = runtime.to_device(augment.to_float(data.images[index]))
            if args.schedule == "cosine":
                for group in optimiser.param_groups:
                    group["lr"] = 0.01 * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(x), data.labels[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
            if step in checks:
                negative_entropy = -prediction_entropy(predict(model, data.images, runtime))
                features = extract_features(model, data.images, runtime)
                seeds = negative_entropy.argsort(descending=True)[:len(data) // 100]
                z = F.normalize(features - features.mean(0), dim=1)
                ranked = {"entropy": negative_entropy, "centroid": z @ z[seeds].mean(0),
                          "knn": seed_similarity(features, seeds, 10)}
                shown = "  ".join(f"{name} AUROC {detection_metrics(s, truth)['auroc']:.3f} "
                                  f"recall@10% {recall_at(s, truth):.3f}" for name, s in ranked.items())
                print(f"step {step} ({time.time() - start:.0f} s): {shown}", flush=True)


if __name__ == "__main__":
    main()
