"""Named datasets (CIFAR-10, GTSRB) resolved from a data root, and user ImageFolders.

A data root (`--data-root` or `UNPOISON_DATA`) may hold, for CIFAR-10 (GTSRB alike):
  cifar10-jpeg.tar.gz     an ImageFolder archive with train/ and test/
  cifar10/ (or cifar10-jpeg/)  the same, extracted
  cifar-10-batches-py/    torchvision's format (checked against its published MD5s
                          before torchvision unpickles it, so only the official files load)
Otherwise torchvision downloads it into the root; offline, the error says what to put where.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cache
from .folder import read_image_folder
from .imageset import ImageSet

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class DatasetNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class NamedDataset:
    name: str
    title: str
    archives: tuple[str, ...]
    folders: tuple[str, ...]
    torchvision_folder: str
    num_classes: int


DATASETS = {
    "cifar10": NamedDataset("cifar10", "CIFAR-10", ("cifar10-jpeg.tar.gz", "cifar10.tar.gz"),
                            ("cifar10", "cifar10-jpeg"), "cifar-10-batches-py", 10),
    "gtsrb": NamedDataset("gtsrb", "GTSRB", ("gtsrb32.tar.gz", "gtsrb.tar.gz"), ("gtsrb32",), "gtsrb", 43),
}


def default_data_root(data_root: str | os.PathLike | None = None) -> Path:
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get("UNPOISON_DATA"):
        return Path(os.environ["UNPOISON_DATA"]).expanduser()
    return cache.cache_dir() / "data"


def load_dataset(name: str, split: str, data_root: str | os.PathLike | None = None,
                 use_cache: bool = True) -> ImageSet:
    """Load split 'train' or 'test' of a named dataset as uint8 tensors (decoded once, cached)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
                         "(use `unpoison train --data DIR` for your own ImageFolder)")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    spec = DATASETS[name]
    root = default_data_root(data_root)
    for archive in spec.archives:
        path = root / archive
        if path.is_file():
            return load_image_folder(path, split, use_cache=use_cache)
    for folder in spec.folders:
        path = root / folder
        if (path / split).is_dir():
            return load_image_folder(path, split, use_cache=use_cache)
    return _load_torchvision(spec, split, root, use_cache)


def load_image_folder(path: str | os.PathLike, split: str | None = None, image_size: int = 32,
                      classes: list[str] | None = None, use_cache: bool = True) -> ImageSet:
    """A user ImageFolder (directory or archive), decoded once and cached by content hash."""
    path = Path(path).resolve()
    key = {"kind": "folder", "content": cache.hash_path(path), "split": split, "size": image_size,
           "classes": classes}
    return cache.cached(key, lambda: read_image_folder(path, split, image_size, classes), use_cache)


def _load_torchvision(spec: NamedDataset, split: str, root: Path, use_cache: bool) -> ImageSet:
    import torchvision

    train = split == "train"
    try:
        if spec.name == "cifar10":
            tv = torchvision.datasets.CIFAR10(str(root), train=train, download=True)
            return ImageSet(torch.from_numpy(np.ascontiguousarray(tv.data)).permute(0, 3, 1, 2).contiguous(),
                            torch.tensor(tv.targets), list(tv.classes))
        tv = torchvision.datasets.GTSRB(str(root), split=split, download=True)
    except Exception as exc:  # offline, corrupted download, checksum mismatch ...
        raise DatasetNotFound(_not_found_message(spec, root, exc)) from None
    key = {"kind": "torchvision-gtsrb", "root": str(root), "split": split}
    return cache.cached(key, lambda: _decode_samples(tv._samples, spec.num_classes), use_cache)


def _decode_samples(samples: list[tuple[str, int]], num_classes: int) -> ImageSet:
    from .folder import decode_image

    arrays, labels = [], []
    for path, label in samples:
        arrays.append(decode_image(Path(path).read_bytes(), (32, 32)))
        labels.append(label)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(labels), [f"{i:02d}" for i in range(num_classes)])


def _not_found_message(spec: NamedDataset, root: Path, exc: Exception) -> str:
    return (
        f"{spec.title} was not found in the data root {root} and could not be downloaded "
        f"({type(exc).__name__}: {exc}).\n"
        f"Put one of these in {root}, or point --data-root / UNPOISON_DATA at a folder that has one:\n"
        f"  {spec.archives[0]}   an ImageFolder archive with train/<class>/* and test/<class>/*\n"
        f"  {spec.folders[0]}/   the same, extracted\n"
        f"  {spec.torchvision_folder}/   torchvision's own download of {spec.title}\n"
        f"or run once with internet access so torchvision can download it."
    )
