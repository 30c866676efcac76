import os
from pathlib import Path

import pytest
import torch

from unpoison.data.imageset import ImageSet
from unpoison.runtime import Runtime

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own model cache; decoded datasets are shared (read-mostly)."""
    monkeypatch.setenv("UNPOISON_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture
def cpu() -> Runtime:
    return Runtime.create("cpu", "fp32")


def data_root() -> Path | None:
    root = os.environ.get("UNPOISON_DATA")
    candidates = [Path(root)] if root else []
    candidates.append(SHARED)
    for c in candidates:
        if (c / "cifar10-jpeg.tar.gz").exists() or (c / "cifar10").is_dir():
            return c
    return None


_CIFAR_FOUND = pytest.mark.skipif(data_root() is None, reason="CIFAR-10 not found: set UNPOISON_DATA "
                                  "to a folder with cifar10-jpeg.tar.gz")


def requires_cifar(test):
    """A test on the real CIFAR-10: marked integration and slow, skipped without the data."""
    return pytest.mark.integration(pytest.mark.slow(_CIFAR_FOUND(test)))


def toy_dataset(n: int = 256, num_classes: int = 4, size: int = 16, seed: int = 0) -> ImageSet:
    """Separable toy images: each class is a noisy colour, so tiny models learn them fast."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    palette = torch.rand(num_classes, 3, 1, 1, generator=g) * 160 + 40
    noise = torch.randn(n, 3, size, size, generator=g) * 25
    images = (palette[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, [f"class{i}" for i in range(num_classes)])
