"""Does a clean-label poison group survive blending better than an easy clean group?

For the probe's set-aside 10 % (benchmarks/probe_groups.py must have written OUT/ATTACK.pt),
each image is blended with random images of the set (weight `alpha` on the image, 4 draws)
and the probe's probability for its given label is averaged; printed per label group, and for
the poisoned images of a group apart. A learned trigger would keep its label through the
blend (STRIP's idea) while an easy clean image would not.

    PYTHONPATH=src python benchmarks/blend_persistence.py none "{}" --out /tmp/probe
    PYTHONPATH=src python benchmarks/blend_persistence.py sig "{'rate': 0.05}" --out /tmp/probe
"""

import argparse
import ast
import os
from pathlib import Path

import torch

from probe_groups import poisoned_set
from unpoison.detect.expand import ExpandConfig, SeedExpansion
from unpoison.train.supervised import predict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("attack")
    parser.add_argument("params", help="attack parameters as a Python dict, e.g. \"{'rate': 0.05}\"")
    parser.add_argument("--out", type=Path, required=True, help="probe_groups.py's output folder")
    parser.add_argument("--draws", type=int, default=4)
    args = parser.parse_args()
    data, _, ctx = poisoned_set(args.attack, ast.literal_eval(args.params), os.environ["UNPOISON_DATA"], args.out, 0)
    runtime = ctx.runtime
    model = SeedExpansion(ExpandConfig.for_profile("quick")).train_model(data, ctx)   # the cached probe
    record = torch.load(args.out / f"{args.attack}.pt", weights_only=False)
    scores, labels, poison = record["scores"], record["labels"], record["is_poison"]
    n = len(labels)
    top = torch.argsort(scores, descending=True, stable=True)[: n // 10]
    g = torch.Generator().manual_seed(0)
    for alpha in (0.5, 0.7):
        kept_prob = torch.zeros(len(top))
        for _ in range(args.draws):
            other = torch.randint(0, n, (len(top),), generator=g)
            mixed = (alpha * data.images[top].float() + (1 - alpha) * data.images[other].float()).round().to(torch.uint8)
            probs = torch.softmax(predict(model, mixed, runtime).float(), 1)
            kept_prob += probs.gather(1, labels[top][:, None]).squeeze(1) / args.draws
        print(f"alpha {alpha}: median probability of the given label after the blend")
        for c in range(len(data.classes)):
            group = labels[top] == c
            if group.sum() < 20:
                continue
            bad = group & poison[top]
            line = f"  {data.classes[c]:>10} n={int(group.sum()):5d} all {float(kept_prob[group].median()):.3f}"
            if bad.any():
                line += f" poison ({int(bad.sum())}) {float(kept_prob[bad].median()):.3f}"
            print(line)


if __name__ == "__main__":
    main()
