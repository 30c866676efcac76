"""Images to label with `unpoison predict`: an ImageFolder (directory or archive), a flat
directory of images, or a single image, decoded with the same safety rules as training data."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import load_image_folder
from .folder import IMAGE_EXTENSIONS, MAX_FILE_BYTES, DataFormatError, decode_image, is_archive


@dataclass
class LooseImages:
    """Images to label: pixels, their paths, and the folder's own label when it names a
    class the model knows (-1 otherwise)."""

    images: torch.Tensor
    paths: list[str]
    labels: torch.Tensor
    skipped: list[str]


def read_images_to_predict(path: Path, size: tuple[int, int], classes: list[str]) -> LooseImages:
    """An ImageFolder (directory or archive), a flat directory of images, or one image."""
    index = {c: i for i, c in enumerate(classes)}
    arrays: list[np.ndarray] = []
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[str] = []
    if path.is_file() and not is_archive(path):
        _read_loose([path], path.parent, size, arrays, paths, skipped)
        labels.extend([-1] * len(arrays))
    else:
        if path.is_dir():
            loose = sorted(p for p in path.iterdir() if not p.name.startswith(".") and not p.is_dir())
            _read_loose(loose, path, size, arrays, paths, skipped)
            labels.extend([-1] * len(arrays))
        try:
            folder = load_image_folder(path, None, image_size=size)
        except DataFormatError as exc:
            if not arrays:
                raise DataFormatError(f"no images to predict in {path}: {exc}") from None
            folder = None
        if folder is not None:
            arrays.extend(folder.images.permute(0, 2, 3, 1).numpy())
            paths.extend(folder.paths or [])
            labels.extend(index.get(folder.classes[int(y)], -1) for y in folder.labels)
            skipped.extend(folder.skipped)
    if not arrays:
        raise DataFormatError(f"no decodable images in {path} ({len(skipped)} files skipped)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return LooseImages(images, paths, torch.tensor(labels, dtype=torch.long), skipped)


def _read_loose(files: list[Path], root: Path, size, arrays, paths, skipped) -> None:
    real_root = os.path.realpath(root)
    for full in files:
        rel = full.name
        if full.is_symlink() and not os.path.realpath(full).startswith(real_root.rstrip(os.sep) + os.sep):
            skipped.append(f"{rel}: symlink points outside the folder")
            continue
        if full.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append(f"{rel}: not an image file extension")
            continue
        try:
            info = full.stat()
        except OSError as exc:
            skipped.append(f"{rel}: cannot read: {exc.strerror or exc}")
            continue
        if not stat.S_ISREG(info.st_mode):  # reading a FIFO or device would block forever
            skipped.append(f"{rel}: not a regular file (pipe, socket or device), refused")
            continue
        if info.st_size > MAX_FILE_BYTES:
            skipped.append(f"{rel}: file larger than {MAX_FILE_BYTES} bytes")
            continue
        try:
            arrays.append(decode_image(full.read_bytes(), size))
        except ValueError as exc:
            skipped.append(f"{rel}: {exc}")
            continue
        paths.append(rel)
