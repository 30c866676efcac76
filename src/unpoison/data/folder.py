"""Read an ImageFolder (`root/<class>/<image>`) from a directory or a tar archive.

The folder is treated as hostile: nothing in it is ever unpickled or executed, members
of an archive are read in memory and never extracted (so `..` or absolute member names
cannot write anywhere), symlinks that leave the folder are refused, and an image that
fails to decode (corrupt, truncated, empty, not an image, a decompression bomb) is
skipped and reported instead of crashing a long run.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .imageset import ImageSet

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".tif", ".tiff"}
# A 32x32 dataset has no business holding a 50-megapixel image; a larger header is
# treated as a decompression bomb and the file is skipped before any pixel is decoded.
MAX_PIXELS = 50_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_ARCHIVE_BYTES = 4 * 1024 ** 3   # image bytes an archive may hold in memory while it is read
RESIZE_POLICY = ("every image is converted to RGB (alpha composited on white, palette and "
                 "grayscale expanded) and resized as a whole, without cropping, with bilinear "
                 "interpolation to {h}x{w}")


class DataFormatError(ValueError):
    """The folder cannot be read as an ImageFolder at all (not a single bad image)."""


@dataclass
class _Entry:
    relpath: str      # path inside the folder or archive, POSIX separators
    class_name: str


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")))


def decode_image(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """Decode bytes into an (H, W, 3) uint8 array of the given size. Raises ValueError."""
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL warns at open() above its own limit; our MAX_PIXELS check below is stricter
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            width, height = im.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"declared size {width}x{height} exceeds {MAX_PIXELS} pixels (decompression bomb?)")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.load()
            rgb = _to_rgb(im)
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for bad data (OSError, SyntaxError, ...)
        raise ValueError(f"cannot decode: {type(exc).__name__}: {exc}") from None
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        arr = (arr / max(arr.max(), 1.0) * 255.0).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    return im.convert("RGB")


# --------------------------------------------------------------------------- listing

def _safe_member_name(name: str) -> str | None:
    """The normalised POSIX path of a tar member, or None when it tries to escape."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or (path.parts and ":" in path.parts[0]):
        return None
    parts = [p for p in path.parts if p not in ("", ".")]
    return "/".join(parts)  # "" for the archive's root entry ("." from `tar -C dir .`)


def _split_class(relpath: str, prefix: str) -> _Entry | None:
    if prefix and not relpath.startswith(prefix + "/"):
        return None
    rest = relpath[len(prefix) + 1:] if prefix else relpath
    parts = rest.split("/")
    if len(parts) < 2 or Path(parts[-1]).suffix.lower() not in IMAGE_EXTENSIONS:
        return None
    return _Entry(relpath, unicodedata.normalize("NFC", parts[0]))


def _list_directory(root: Path, prefix: str, refused: list[str]) -> tuple[list[_Entry], set[str]]:
    base = root / prefix if prefix else root
    if not base.is_dir():
        raise DataFormatError(f"{base} is not a directory")
    real_root = os.path.realpath(root)
    class_dirs = set()
    entries: list[_Entry] = []
    for child in sorted(base.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            if child.is_symlink() and not _inside(os.path.realpath(child), real_root):
                refused.append(f"{child.relative_to(root).as_posix()}: symlink points outside the folder")
                continue
            class_dirs.add(unicodedata.normalize("NFC", child.name))
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if name.startswith("."):
                continue
            if full.is_symlink() and not _inside(os.path.realpath(full), real_root):
                refused.append(f"{rel}: symlink points outside the folder")
                continue
            if _is_special(full):
                refused.append(f"{rel}: not a regular file (pipe, socket or device), refused")
                continue
            entry = _split_class(rel, prefix)
            if entry is not None:
                entries.append(entry)
            elif Path(name).suffix.lower() not in IMAGE_EXTENSIONS and Path(dirpath) != base:
                refused.append(f"{rel}: not an image file extension")
    return entries, class_dirs


def _is_special(path: Path) -> bool:
    """A FIFO, socket or device: reading one blocks forever or never ends."""
    try:
        return not stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False  # dangling link: reported when it is read


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _iter_archive(path: Path, refused: list[str]) -> Iterator[tuple[str, tarfile.TarInfo, tarfile.TarFile]]:
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise DataFormatError(f"cannot open archive {path}: {exc}") from None
    with archive:
        for member in archive:
            name = _safe_member_name(member.name)
            if name == "":
                continue
            if name is None:
                refused.append(f"{member.name}: unsafe path in archive (absolute or '..'), refused")
                continue
            if member.issym() or member.islnk():
                refused.append(f"{name}: link inside archive, refused")
                continue
            yield name, member, archive


def _archive_prefix(names: list[str], split: str | None) -> str:
    """The folder inside an archive that holds the class folders (tolerates one wrapper dir)."""
    files = [n for n in names if not n.endswith("/")]
    tops = {n.split("/", 1)[0] for n in names}
    wrapper = next(iter(tops)) if len(tops) == 1 else None
    if split:
        for prefix in (split, f"{wrapper}/{split}" if wrapper else None):
            if prefix and any(n.startswith(prefix + "/") for n in files):
                return prefix
        raise DataFormatError(f"archive has no '{split}/' folder (top-level entries: {sorted(tops)[:10]})")
    if wrapper and files and all(n.count("/") >= 2 for n in files):
        return wrapper
    return ""


# --------------------------------------------------------------------------- loading

def read_image_folder(path: str | Path, split: str | None = None, image_size: int | tuple[int, int] = 32,
                      classes: list[str] | None = None) -> ImageSet:
    """Decode an ImageFolder directory or archive (optionally its `split/` subfolder).

    `classes` fixes the class order (e.g. a test folder must use the train folder's
    classes); otherwise classes are the sorted class-folder names.
    """
    path = Path(path)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    refused: list[str] = []
    if is_archive(path):
        blobs: dict[str, bytes] = {}
        sizes_ok: dict[str, bool] = {}
        members = []
        held = 0
        for name, member, archive in _iter_archive(path, refused):
            if member.isfile():
                members.append(name)
                if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue  # never read: only image files are decoded, and they are listed as skipped
                if member.size > MAX_FILE_BYTES:
                    sizes_ok[name] = False
                    continue
                held += member.size
                if held > MAX_ARCHIVE_BYTES:  # a tar bomb must end in a message, not in the OOM killer
                    raise DataFormatError(f"{path} holds more than {MAX_ARCHIVE_BYTES >> 30} GiB of image files; "
                                          "extract it and pass the folder instead")
                handle = archive.extractfile(member)
                blobs[name] = handle.read() if handle else b""
            elif member.isdir():
                members.append(name + "/")
        prefix = _archive_prefix(members, split)
        entries = [e for e in (_split_class(n, prefix) for n in members if not n.endswith("/")) if e]
        inside = [n[len(prefix) + 1:] if prefix else n for n in members
                  if not n.endswith("/") and (not prefix or n.startswith(prefix + "/"))]
        refused += [f"{prefix + '/' if prefix else ''}{n}: not an image file extension" for n in inside
                    if "/" in n and PurePosixPath(n).suffix.lower() not in IMAGE_EXTENSIONS]
        class_dirs = {unicodedata.normalize("NFC", n[len(prefix) + 1 if prefix else 0:].split("/")[0])
                      for n in members if n.startswith(prefix + "/" if prefix else "") and
                      "/" in n[len(prefix) + 1 if prefix else 0:]}
        read = lambda e: blobs.get(e.relpath) if sizes_ok.get(e.relpath, True) else None  # noqa: E731
    elif path.is_dir():
        prefix = split or ""
        if split and not (path / split).is_dir():
            raise DataFormatError(f"{path} has no '{split}/' folder")
        entries, class_dirs = _list_directory(path, prefix, refused)

        def read(e: _Entry) -> bytes | None:
            full = path / e.relpath
            if full.stat().st_size > MAX_FILE_BYTES:
                return None
            return full.read_bytes()
    else:
        raise DataFormatError(f"{path} is neither a directory nor a tar archive")

    class_names = list(classes) if classes is not None else sorted(class_dirs)
    if not class_names:
        raise DataFormatError(f"no class folders found in {path}{'/' + split if split else ''}: "
                              "expected <root>/<class>/<image>")
    index = {c: i for i, c in enumerate(class_names)}
    arrays, labels, paths = [], [], []
    skipped = list(refused)
    for entry in entries:
        if entry.class_name not in index:
            skipped.append(f"{entry.relpath}: class '{entry.class_name}' is not one of the known classes")
            continue
        try:
            data = read(entry)
        except OSError as exc:  # a dangling symlink, a file without read permission, an I/O error
            skipped.append(f"{entry.relpath}: cannot read: {exc.strerror or exc}")
            continue
        if data is None:
            skipped.append(f"{entry.relpath}: file larger than {MAX_FILE_BYTES} bytes")
            continue
        try:
            arrays.append(decode_image(data, size))
        except ValueError as exc:
            skipped.append(f"{entry.relpath}: {exc}")
            continue
        labels.append(index[entry.class_name])
        paths.append(entry.relpath)
    if not arrays:
        raise DataFormatError(f"no decodable images in {path}{'/' + split if split else ''} "
                              f"({len(skipped)} files skipped)")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    dataset = ImageSet(images, torch.tensor(labels), class_names, paths)
    dataset.skipped = skipped
    return dataset
