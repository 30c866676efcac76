"""Per-class clean test accuracy of cached models: where does a CA drop come from?

    UNPOISON_DATA=../shared/datasets python benchmarks/per_class_accuracy.py \\
        ~/.cache/unpoison/models/KEY.pt [...] [--dataset cifar10] [--model wrn16-1]

A cache entry's KEY is printed in a run's metrics.json (`reused_models`) whenever a later run
reused it, e.g. D-BR reuses the no-defence model of its attack. Used in RESULTS.md to show
that SIG's and LC's CA drop is the target class alone.
"""

from __future__ import annotations

import argparse
import sys

import torch

from unpoison.data import load_dataset
from unpoison.models import build_model
from unpoison.runtime import Runtime
from unpoison.train.supervised import predict


def load_cached(path: str, architecture: str, num_classes: int) -> torch.nn.Module:
    model = build_model(architecture, num_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", nargs="+", help="model cache entries (.pt with a state_dict)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--model", default="wrn16-1")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    runtime = Runtime.create(args.device)
    test = load_dataset(args.dataset, "test")
    for path in args.entries:
        model = runtime.prepare_model(load_cached(path, args.model, test.num_classes)).eval()
        pred = predict(model, test.images, runtime).argmax(1)
        per_class = [float((pred[test.labels == c] == c).float().mean()) * 100 for c in range(test.num_classes)]
        overall = float((pred == test.labels).float().mean()) * 100
        print(f"{path}: CA {overall:.2f} %; per class " + ", ".join(
            f"{name} {acc:.1f}" for name, acc in zip(test.classes, per_class)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
