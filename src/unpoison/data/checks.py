"""Checks of an untrusted folder's classes: empty classes, too few classes, one-image
classes, and pixel-identical images filed under two labels (label flipping looks like that)."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..console import say
from .folder import DataFormatError
from .imageset import ImageSet


@dataclass
class ClassCheck:
    data: ImageSet
    warnings: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def check_classes(data: ImageSet, min_classes: int = 2, drop_empty: bool = True) -> ClassCheck:
    """Empty classes are dropped (a model cannot learn a class it never sees; when the
    classes are fixed by a model, they are only warned about), fewer than `min_classes`
    is an error, one-image classes and images that appear under two labels are warned
    about: the last is what label flipping or a sloppy merge looks like."""
    counts = data.class_counts()
    empty = [c for c, n in zip(data.classes, counts.tolist()) if n == 0]
    check = ClassCheck(data)
    if empty and not drop_empty:
        check.warnings.append(f"{len(empty)} of the model's classes have no image in this folder: {_names(empty)}")
    elif empty:
        keep = [i for i, n in enumerate(counts.tolist()) if n > 0]
        remap = torch.full((data.num_classes,), -1, dtype=torch.long)
        remap[keep] = torch.arange(len(keep))
        check.data = ImageSet(data.images, remap[data.labels], [data.classes[i] for i in keep], data.paths)
        check.data.skipped = data.skipped
        check.dropped = empty
        check.warnings.append(f"{len(empty)} class folder(s) hold no usable image and are left out of the model: "
                              f"{_names(empty)}")
    present = [c for c, n in zip(check.data.classes, check.data.class_counts().tolist()) if n > 0]
    if len(present) < min_classes:
        raise DataFormatError(f"a classifier needs at least {min_classes} classes with images; found "
                              f"{len(present)} ({_names(present) or 'none'}). Expected <root>/<class>/<image> "
                              "with one folder per class")
    counts = check.data.class_counts().tolist()
    single = [c for c, n in zip(check.data.classes, counts) if n == 1]
    if single:
        check.warnings.append(f"{len(single)} class(es) have a single image, too few to learn or to check: "
                              f"{_names(single)}")
    clashes = cross_class_duplicates(check.data)
    if clashes:
        example = " = ".join(f"{p} ({c})" for p, c in clashes[0])
        check.warnings.append(f"{len(clashes)} image(s) appear with different labels (identical pixels after "
                              f"decoding), e.g. {example}; duplicated images under two labels are label noise "
                              "or poisoning")
    for line in check.warnings:
        say(f"[data] warning: {line}")
    return check


def _names(names: Iterable[str], limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def cross_class_duplicates(data: ImageSet) -> list[list[tuple[str, str]]]:
    """Groups of pixel-identical images that carry more than one label."""
    groups: dict[bytes, list[int]] = defaultdict(list)
    flat = data.images.reshape(len(data), -1).numpy()
    for i in range(len(data)):
        groups[hashlib.blake2b(flat[i].tobytes(), digest_size=16).digest()].append(i)
    clashes = []
    for index in groups.values():
        if len(index) > 1 and len({int(data.labels[i]) for i in index}) > 1:
            clashes.append([(data.paths[i] if data.paths else f"#{i}", data.classes[int(data.labels[i])])
                            for i in index])
    return clashes
