"""How much poison would quarantine's stage 1 set aside, by seed expansion alone or with a spectral
share? For diagnosis, on the per-epoch files `benchmarks/probe_recipes.py --save PREFIX` writes:
for each split (expansion's top share + the spectral share among the rest, as
`defenses/quarantine.set_aside` does), the poisoned images set aside. The poison mask is read for
the printout only.

    PYTHONPATH=src python benchmarks/set_aside_offline.py /tmp/blended-r01-epoch3.pt ...
"""

from __future__ import annotations

import sys

import torch

from unpoison.data.imageset import ImageSet
from unpoison.defenses.quarantine import QuarantineConfig, set_aside
from unpoison.detect.entropy import prediction_entropy
from unpoison.detect.expand import seed_similarity
from unpoison.metrics import detection_metrics
from unpoison.detect.spectral import spectral_scores

SPLITS = ((0.2, 0.0), (0.2, 0.05), (0.2, 0.1), (0.25, 0.05), (0.3, 0.1))   # (quarantine_fraction, spectral_fraction)


def main() -> None:
    for path in sys.argv[1:]:
        saved = torch.load(path)
        features, labels, poison = saved["features"].float(), saved["labels"], saved["poison"]
        n, classes = len(labels), int(labels.max()) + 1
        seeds = torch.argsort(prediction_entropy(saved["logits"]), stable=True)[: max(2, n // 100)]
        expand = seed_similarity(features, seeds, 10)
        data = ImageSet(torch.zeros(n, 3, 1, 1, dtype=torch.uint8), labels, [str(c) for c in range(classes)])
        spectral = spectral_scores(features, labels, classes)
        cells = [f"{q:g}/{s:g}: {int((set_aside(expand, features, data, QuarantineConfig(quarantine_fraction=q, spectral_fraction=s)) & poison).sum())}"
                 for q, s in SPLITS]
        print(f"{path}: {int(poison.sum())} poisoned; AUROC expansion {detection_metrics(expand, poison)['auroc']:.3f}, "
              f"spectral {detection_metrics(spectral, poison)['auroc']:.3f}; set aside (fraction/spectral share): "
              + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
