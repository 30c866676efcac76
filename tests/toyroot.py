"""A tiny stand-in for CIFAR-10 on disk: an ImageFolder laid out as DATA_ROOT/cifar10/{train,test}/<class>/,
so `unpoison run --dataset cifar10 --data-root DATA_ROOT` runs end to end in a second or two."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_toy_cifar(root: Path, n_train: int = 80, n_test: int = 40, num_classes: int = 10) -> Path:
    """Each class is a noisy flat colour (the same colours in both splits, fresh noise in each)."""
    palette = np.random.default_rng(0).uniform(40, 200, size=(num_classes, 1, 1, 3))
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        rng = np.random.default_rng(seed)
        labels = np.arange(n) % num_classes
        images = np.clip(palette[labels] + rng.normal(0, 25, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
        for i, label in enumerate(labels):
            folder = root / "cifar10" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{split}{i:04d}.png")
    return root
