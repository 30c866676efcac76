"""An ImageFolder nobody can vouch for, as `scan`, `train` and `repair` read it.

A user brings a folder of labelled images that may be the attacker's. It is decoded by
`data.folder` (never unpickled, never extracted; bad files skipped and listed, each with its
reason), its class structure is checked (`data.checks`) before an hour of training is spent
on it, and a held-out set is found: a `--test` folder, the layout's own `test/`, or a
stratified `--val-split` of the untrusted folder itself. The output folder may not lie
inside the data (it would be read back as a class on the next run).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..console import UserError, say
from ..runtime import generator
from .checks import check_classes
from .datasets import load_image_folder
from .folder import RESIZE_POLICY, DataFormatError, is_archive
from .imageset import ImageSet


def resize_policy(size: tuple[int, int]) -> str:
    return RESIZE_POLICY.format(h=size[0], w=size[1])


def check_paths(data: str | os.PathLike, out: str | os.PathLike) -> tuple[Path, Path]:
    """The data must exist; the output folder must not lie inside it (outputs would be
    read back as images of a class named after the output folder on the next run)."""
    data_path, out_path = Path(data).expanduser(), Path(out).expanduser()
    if not data_path.exists():
        raise UserError(f"--data {data_path} does not exist")
    real_data, real_out = os.path.realpath(data_path), os.path.realpath(out_path)
    if data_path.is_dir() and (real_out == real_data or real_out.startswith(real_data.rstrip(os.sep) + os.sep)):
        raise UserError(f"the output folder {out_path} is inside the data folder {data_path}; choose another --out")
    return data_path, out_path


def detect_split(path: Path, split: str | None) -> str | None:
    """'auto' picks `train/` when the folder is a split layout (train/<class>/<image>,
    as `unpoison poison` writes it); a class that happens to be called 'train' holds
    images, not folders, so it is not mistaken for one."""
    if split != "auto":
        return split or None
    if path.is_dir():
        train = path / "train"
        return "train" if train.is_dir() and any(c.is_dir() for c in train.iterdir()) else None
    if is_archive(path):
        import tarfile

        try:
            with tarfile.open(path, mode="r:*") as archive:
                for member in archive:
                    parts = member.name.strip("/").split("/")
                    if member.isfile() and len(parts) >= 3 and "train" in parts[:-2]:
                        return "train"
        except (tarfile.TarError, OSError) as exc:
            raise DataFormatError(f"cannot open archive {path}: {exc}") from None
    return None


def sibling_split(path: Path, split: str | None, name: str) -> str | None:
    """When training on `train/` of a split layout, its `test/` is the natural held-out set."""
    if split != "train":
        return None
    if path.is_dir():
        return name if (path / name).is_dir() else None
    return name  # in an archive we only know by trying; read_image_folder says if it is absent


def load_folder(path: Path, split: str | None, image_size: tuple[int, int], classes: list[str] | None = None,
                what: str = "data") -> ImageSet:
    """Decode an ImageFolder (cached by content) and report every skipped file by reason."""
    shown = f"{path}/{split}" if split else str(path)
    data = load_image_folder(path, split, image_size=image_size, classes=classes)
    say(f"[{what}] {shown}: {len(data)} images in {data.num_classes} classes; {resize_policy(image_size)}")
    if data.skipped:
        reasons = Counter(_reason(s) for s in data.skipped)
        summary = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
        say(f"[{what}] skipped {len(data.skipped)} files ({summary}); first: {data.skipped[0]}")
    return data


def _reason(line: str) -> str:
    reason = line.rsplit(": ", 1)[-1] if ": " in line else line
    for key in ("symlink", "unsafe path", "link inside", "decompression bomb", "empty file", "not an image",
                "larger than", "not one of the known classes", "cannot decode", "cannot read",
                "not a regular file"):
        if key in line:
            return key
    return reason[:40]


def stratified_split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet | None]:
    """Hold out `fraction` of every class (at least one image stays in training)."""
    if not 0 <= fraction < 1:
        raise UserError(f"--val-split must lie in [0, 1), got {fraction}")
    if fraction == 0:
        return data, None
    g = generator(seed, "held-out")
    held = []
    for c in range(data.num_classes):
        members = (data.labels == c).nonzero().flatten()
        n = min(int(round(fraction * len(members))), len(members) - 1)
        held.append(members[torch.randperm(len(members), generator=g)[:n]])
    held_index = torch.cat(held).sort().values
    mask = torch.zeros(len(data), dtype=torch.bool)
    mask[held_index] = True
    if not mask.any():
        return data, None
    return data.subset(~mask), data.subset(mask)


@dataclass
class TrainingData:
    train: ImageSet
    held_out: ImageSet | None
    held_out_source: str
    warnings: list[str]
    source: str
    image_size: tuple[int, int]
    skipped: list[str]


def load_training_data(data: Path, split: str | None, image_size: int | tuple[int, int], val_split: float | None,
                       test: str | None, seed: int, classes: list[str] | None = None) -> TrainingData:
    """Training images plus a held-out set: `--test DIR`, else the layout's own `test/`,
    else a stratified `--val-split` (default 10 %) of the untrusted folder itself.
    `classes` fixes the class list (a model being repaired already has one)."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    split = detect_split(data, split)
    if split:
        say(f"[data] {data} holds a '{split}/' folder: training on it")
    loaded = load_folder(data, split, size, classes=classes, what="train")
    checked = check_classes(loaded, drop_empty=classes is None)
    train = checked.data
    skipped = list(train.skipped)
    source = f"{data}/{split}" if split else str(data)
    held_out, held_source = None, "none"
    test_path, test_split = None, None
    if test is not None:
        test_path = Path(test).expanduser()
        if not test_path.exists():
            raise UserError(f"--test {test_path} does not exist")
        test_split = "test" if detect_split(test_path, "auto") == "train" else None
    elif val_split is None and sibling_split(data, split, "test"):
        test_path, test_split = data, "test"
    if test_path is not None:
        try:
            held_out = load_folder(test_path, test_split, size, classes=train.classes, what="held-out")
            skipped += [f"held-out: {line}" for line in held_out.skipped]
            held_source = f"test folder {test_path}" + (f"/{test_split}" if test_split else "")
        except DataFormatError as exc:
            if test is not None:
                raise
            say(f"[data] no usable test/ next to train/ ({exc}); holding out a validation split instead")
    if held_out is None:
        fraction = 0.1 if val_split is None else val_split
        train, held_out = stratified_split(train, fraction, seed)
        if held_out is not None:
            held_source = f"{fraction:.0%} stratified validation split of the untrusted data (may hold poisoned images)"
    say(f"[data] training on {len(train)} images; held-out: "
        f"{len(held_out) if held_out is not None else 0} images ({held_source})")
    return TrainingData(train, held_out, held_source, checked.warnings, source, size, skipped)
