"""Decode once: decoded datasets are cached as plain .npy arrays keyed by a content hash.

Only `numpy.load(allow_pickle=False)` and JSON are used to read the cache back, so even
a tampered cache cannot execute code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..distributed import is_main, main_first
from .imageset import ImageSet

# Bump when decoding changes (resize policy, colour conversion...) to invalidate caches.
DECODER_VERSION = 1


def cache_dir() -> Path:
    root = os.environ.get("UNPOISON_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "unpoison")
    return Path(root)


def hash_path(path: Path) -> str:
    """sha256 of a file's bytes, or of every file (relative path + bytes) under a directory."""
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
        return digest.hexdigest()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            digest.update(full.relative_to(path).as_posix().encode() + b"\0")
            if full.is_symlink():
                digest.update(b"link:" + os.readlink(full).encode())
            elif full.is_file():
                _hash_file(full, digest)
            else:  # a FIFO or device in a hostile folder: reading it would block forever
                digest.update(b"special")
    return digest.hexdigest()


def _hash_file(path: Path, digest) -> None:
    # in blocks: a folder may hold a multi-gigabyte non-image file
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def cached(key: dict, build: Callable[[], ImageSet], enabled: bool = True) -> ImageSet:
    """Return the ImageSet for `key` from the cache, building (and storing) it on a miss."""
    if not enabled:
        return build()
    key = dict(key, decoder=DECODER_VERSION)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    folder = cache_dir() / "decoded" / name
    with main_first():   # under torchrun the other ranks read what rank 0 decoded and stored
        try:
            return _read(folder)
        except (OSError, ValueError, KeyError):
            pass
        dataset = build()
        try:
            if is_main():
                _write(folder, dataset, key)
        except OSError:
            pass  # a read-only cache directory only costs speed
        return dataset


def _read(folder: Path) -> ImageSet:
    meta = json.loads((folder / "meta.json").read_text())
    images = torch.from_numpy(np.load(folder / "images.npy", allow_pickle=False))
    labels = torch.from_numpy(np.load(folder / "labels.npy", allow_pickle=False))
    dataset = ImageSet(images, labels, meta["classes"], meta["paths"])
    dataset.skipped = meta["skipped"]
    return dataset


def _write(folder: Path, dataset: ImageSet, key: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        np.save(tmp / "images.npy", dataset.images.numpy())
        np.save(tmp / "labels.npy", dataset.labels.numpy())
        meta = {"key": key, "classes": dataset.classes, "paths": dataset.paths, "skipped": dataset.skipped}
        (tmp / "meta.json").write_text(json.dumps(meta))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
