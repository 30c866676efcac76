"""Toy user ImageFolders for the scan/train/predict/repair tests (a few dozen images)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

import unpoison.cli as cli

# class names a user might really have: spaces, unicode, a dot
CLASSES = ("cat", "dog house", "ñandú")
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))
FORMATS = ("png", "jpg", "bmp", "webp")


def image_bytes(array: np.ndarray, fmt: str = "png", mode: str | None = None) -> bytes:
    im = Image.fromarray(array)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return buf.getvalue()


def toy_pixels(colour, rng, size=(20, 20)) -> np.ndarray:
    return np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (*size, 3)), 0, 255).astype(np.uint8)


def make_folder(root: Path, per_class: int = 20, classes=CLASSES, poison: int = 0, seed: int = 0) -> Path:
    """root/<class>/<image> in mixed formats and sizes; `poison` images of every other class
    get a white corner patch and are filed under the first class (a dirty-label backdoor)."""
    rng = np.random.default_rng(seed)
    for c, (name, colour) in enumerate(zip(classes, COLOURS)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (20, 20) if i % 3 else (37, 23)
            pixels = toy_pixels(colour, rng, size)
            fmt = FORMATS[i % len(FORMATS)]
            if c > 0 and i < poison:
                pixels[-5:, -5:] = 255
                (root / classes[0] / f"poison-{c}-{i}.png").write_bytes(image_bytes(pixels))
                continue
            (root / name / f"img {i}.{fmt}").write_bytes(image_bytes(pixels, fmt))
    return root


def make_archive(folder: Path, archive: Path, prefix: str = "") -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=f"{prefix}{path.relative_to(folder).as_posix()}")
    return archive


def add_member(archive_path: Path, name: str, data: bytes) -> None:
    """Append a raw member (any name, e.g. '../x' or '/abs') to an uncompressed tar."""
    with tarfile.open(archive_path, "a") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def unpoison(*args: str) -> int:
    """Run the CLI in this process (fast, and monkeypatches reach it)."""
    return cli.main([str(a) for a in args])


SMOKE = ("--profile", "smoke", "--device", "cpu", "--no-progress", "--precision", "fp32")
