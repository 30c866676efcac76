"""The untrusted-dataset workflow shared by `scan`, `train`, `predict` and `repair`.

A user brings a folder of labelled images nobody can vouch for. Everything here treats it
as the attacker's: images are decoded by `data.folder` (never unpickled, never extracted,
bad files skipped and listed), the class structure is checked before an hour of training
is spent on it, and every output is written atomically into the output folder only, under
fixed names, so nothing in the data (a path, a class name) decides where a file lands.
There is no ground truth in this workflow: the only measurement is accuracy on held-out
images (a `--test` folder or a stratified `--val-split` of the untrusted data).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import stat
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .data import DataFormatError, RESIZE_POLICY, load_image_folder
from .data.folder import IMAGE_EXTENSIONS, MAX_FILE_BYTES, decode_image, is_archive
from .data.imageset import ImageSet
from .context import DefenseContext
from .io import atomic_write_text, write_csv, write_json
from .runtime import Runtime, generator

SUSPECTS_HEADER = ["path", "label", "score", "flagged"]
PREDICTIONS_HEADER = ["path", "pred", "class_name", "confidence"]
SPLIT_NAMES = ("train", "test", "val", "valid", "validation", "test_triggered")


class UserError(ValueError):
    """A problem with what the user gave (paths, folders, models): printed, exit code 2."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resize_policy(size: tuple[int, int]) -> str:
    return RESIZE_POLICY.format(h=size[0], w=size[1])


# --------------------------------------------------------------------------- input folders

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


# --------------------------------------------------------------------------- images to predict

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


# --------------------------------------------------------------------------- runs

def prepare_out(out: Path, resume: bool, outputs: Iterable[str]) -> None:
    """A fresh run clears what an earlier run left (checkpoints above all: they would
    silently resume a different run); --resume keeps the checkpoints."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("log.jsonl", "heldout.jsonl", *outputs):
            (out / name).unlink(missing_ok=True)


RUN_IDENTITY = "run-identity.json"


def check_resume(out: Path, resume: bool, identity: dict[str, Any]) -> None:
    """--resume continues only the run that OUT holds: same data (every pixel and label),
    settings and seed. Otherwise the checkpoints would silently finish a different run."""
    from .config import to_plain

    identity = json.loads(json.dumps(to_plain(identity), default=str))
    path = out / RUN_IDENTITY
    if resume and path.exists():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous != identity:
            changed = sorted(k for k in set(identity) | set(previous or {})
                             if (previous or {}).get(k) != identity.get(k))
            raise UserError(f"--resume: {out} holds a run with different {', '.join(changed) or 'settings'}; "
                            "rerun without --resume to start over")
    write_json(path, identity)


def user_context(out: Path, runtime: Runtime, profile: str, seed: int, model: str, progress: bool,
                 share: bool, data: ImageSet) -> DefenseContext:
    """A DefenseContext for a run without ground truth; models that an identical run
    (same pixels, labels, recipe, seed) already trained are reused when `share`."""
    from .artifacts import ModelCache

    ctx = DefenseContext(runtime, profile, seed, model, out, progress=progress, log_path=out / "log.jsonl")
    if share:
        ctx.shared_model = ModelCache.for_context(ctx, data).shared_model
    return ctx


class HeldOutMonitor:
    """Accuracy on held-out images after every stage (and every epoch, on at most
    `sample` images). It returns nothing to the defence. Per-epoch lines are appended
    to OUT/heldout.jsonl, so a resumed run keeps the curve of the epochs before the kill."""

    def __init__(self, held_out: ImageSet | None, runtime: Runtime, out: Path, seed: int, sample: int = 2000) -> None:
        self.held_out, self.runtime, self.path = held_out, runtime, out / "heldout.jsonl"
        self.sample = held_out.head(sample, generator(seed, "held-out-sample")) if held_out is not None else None
        self.stages: dict[str, float] = {}

    def attach(self, ctx: DefenseContext) -> DefenseContext:
        ctx.on_epoch, ctx.on_stage = self.on_epoch, self.on_stage
        return ctx

    def on_epoch(self, stage: str, model: nn.Module, epoch: int) -> None:
        if self.sample is None:
            return
        acc = accuracy(model, self.sample, self.runtime)
        with open(self.path, "a") as f:
            f.write(json.dumps({"stage": stage, "epoch": epoch + 1, "held_out_acc": acc}) + "\n")

    def on_stage(self, stage: str, model: nn.Module) -> None:
        if self.held_out is None:
            return
        self.stages[stage] = accuracy(model, self.held_out, self.runtime)
        say(f"[held-out] after stage {stage}: accuracy {self.stages[stage]:.4f}")

    def curves(self) -> list[dict]:
        if not self.path.exists():
            return []
        latest: dict[tuple, dict] = {}
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            latest[(record["stage"], record["epoch"])] = record
        return list(latest.values())


def accuracy(model: nn.Module, data: ImageSet, runtime: Runtime) -> float:
    from .metrics import accuracy as _accuracy
    from .train.supervised import predict

    return _accuracy(predict(model, data.images, runtime), data.labels)


# --------------------------------------------------------------------------- suspects

def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices from most to least suspicious; NaN counts as most suspicious (a sample a
    detector cannot score is not one to trust), ties keep the folder order."""
    s = torch.nan_to_num(scores.double().cpu(), nan=float("inf"))
    return torch.from_numpy(np.argsort(-s.numpy(), kind="stable"))


def flag_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    if not 0 < fraction <= 1:
        raise UserError(f"--flag-fraction must lie in (0, 1], got {fraction}")
    flagged = torch.zeros(len(scores), dtype=torch.bool)
    flagged[ranking(scores)[: int(round(fraction * len(scores)))]] = True
    return flagged


def write_suspects(path: Path, data: ImageSet, scores: torch.Tensor | None, flagged: torch.Tensor | None) -> None:
    """suspects.csv: path,label,score,flagged, most suspicious first. Without scores
    (a defence that ranks nothing) the rows keep the folder order and score is empty."""
    order = ranking(scores) if scores is not None else torch.arange(len(data))
    names = data.paths or [f"#{i}" for i in range(len(data))]
    rows = []
    for i in order.tolist():
        score = "" if scores is None else f"{float(scores[i]):.6g}"
        mark = "" if flagged is None else int(bool(flagged[i]))
        rows.append((names[i], data.classes[int(data.labels[i])], score, mark))
    write_csv(path, SUSPECTS_HEADER, rows)


def flag_summary(data: ImageSet, flagged: torch.Tensor) -> dict[str, Any]:
    """How many were flagged and where they concentrate. A dirty-label backdoor relabels
    its images to one target class, so that class holds far more than its share."""
    flagged = flagged.bool().cpu()
    n_flagged = int(flagged.sum())
    per_class = torch.bincount(data.labels[flagged], minlength=data.num_classes).tolist()
    sizes = data.class_counts().tolist()
    classes = sorted(({"class": c, "flagged": f, "size": s, "share_of_flagged": f / max(n_flagged, 1),
                       "fraction_of_class": f / max(s, 1)} for c, f, s in zip(data.classes, per_class, sizes)),
                     key=lambda r: -r["flagged"])
    top = classes[0] if classes else None
    # "concentrated": the top class holds over a third of the flags and at least twice
    # its share of the data (a big class collects more flags without being a target)
    concentrated = bool(top and n_flagged and top["share_of_flagged"] >= 0.35
                        and top["share_of_flagged"] >= 2 * top["size"] / max(len(data), 1))
    return {"n": len(data), "n_flagged": n_flagged, "fraction_flagged": n_flagged / max(len(data), 1),
            "classes": classes, "concentrated_in": top["class"] if concentrated else None}


def summary_lines(summary: dict[str, Any], limit: int = 5) -> list[str]:
    lines = [f"flagged {summary['n_flagged']} of {summary['n']} images ({summary['fraction_flagged']:.1%})"]
    shown = [c for c in summary["classes"] if c["flagged"]][:limit]
    if shown:
        lines.append("by class: " + "; ".join(
            f"{c['class']} {c['flagged']} ({c['share_of_flagged']:.0%} of flagged, {c['fraction_of_class']:.0%} "
            f"of the class)" for c in shown))
    if summary["concentrated_in"] is not None:
        lines.append(f"the flagged images concentrate in class {summary['concentrated_in']!r}: this is what a "
                     "backdoor's target class looks like; inspect suspects.csv, suspects.png and "
                     "suspects_in_class.png (that class's most suspicious images)")
    elif summary["n_flagged"]:
        lines.append("the flagged images are spread over the classes: no single target class stands out")
    return lines


def suspect_order(scores: torch.Tensor, labels: torch.Tensor, count: int, label: int | None = None) -> list[int]:
    """Indices of the `count` most suspicious images (of those given `label`, if set)."""
    order = ranking(scores)
    if label is not None:
        order = order[labels[order] == label]
    return order[:count].tolist()


def save_suspect_grid(path: Path, data: ImageSet, scores: torch.Tensor, flagged: torch.Tensor | None,
                      count: int = 64, columns: int = 8, only_label: int | None = None) -> None:
    """A PNG of the `count` most suspicious images, each titled with rank, label, score;
    with `only_label`, of the most suspicious images given that label only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = suspect_order(scores, data.labels, count, only_label)
    rows = max(1, -(-len(order) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.6, rows * 1.85), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for rank, (ax, i) in enumerate(zip(axes.flat, order), start=1):
        ax.imshow(data.images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        mark = "*" if flagged is not None and bool(flagged[i]) else ""
        label = _short(data.classes[int(data.labels[i])], 16)
        # parse_math=False: a class folder named "$\\foo" must not reach the mathtext parser
        ax.set_title(f"{rank}{mark} {label}\n{float(scores[i]):.3g}", fontsize=7, parse_math=False)
    within = "" if only_label is None else f" among the images labelled {_short(data.classes[only_label], 24)!r}"
    fig.suptitle(f"most suspicious first{within} (* = flagged); label and score", fontsize=9, parse_math=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic class names
        _atomic_savefig(fig, path)
    plt.close(fig)


def save_score_histogram(path: Path, scores: torch.Tensor, flagged: torch.Tensor | None) -> None:
    """Histogram of the suspicion scores, flagged images in red: a backdoor tends to show
    as a separate mode at the high end; clean data as one smooth hump."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.nan_to_num(scores.double(), nan=0.0, posinf=0.0, neginf=0.0).numpy()
    bins = np.histogram_bin_edges(values, bins=60)
    fig, ax = plt.subplots(figsize=(7, 3))
    if flagged is not None and flagged.any():
        mask = flagged.bool().numpy()
        ax.hist(values[~mask], bins=bins, color="#4a7ebb", label="not flagged")
        ax.hist(values[mask], bins=bins, color="#c0392b", label="flagged")
        ax.legend()
    else:
        ax.hist(values, bins=bins, color="#4a7ebb")
    ax.set_yscale("log")
    ax.set_xlabel("suspicion score (higher = more suspicious)")
    ax.set_ylabel("images")
    fig.tight_layout()
    _atomic_savefig(fig, path)
    plt.close(fig)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _atomic_savefig(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def write_skipped(out: Path, *lists: Iterable[str]) -> None:
    lines = [line for items in lists for line in items]
    if lines:
        atomic_write_text(out / "skipped.txt", "\n".join(lines) + "\n")
    else:
        (out / "skipped.txt").unlink(missing_ok=True)


# --------------------------------------------------------------------------- report

def write_report(path: Path, title: str, summary: dict[str, Any], notes: list[str], images: dict[str, Path],
                 tables: dict[str, list[dict]] | None = None) -> None:
    """A small self-contained report.html (pictures embedded). Every string that came from
    the data (paths, class names) is HTML-escaped: a class folder may be named <script>."""
    import base64

    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}img{max-width:100%}</style></head><body>",
             f"<h1>{esc(title)}</h1>", "<h2>Summary</h2><table>"]
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        parts.append(f"<tr><th>{esc(str(key))}</th><td>{esc(shown)}</td></tr>")
    parts.append("</table>")
    for name, rows in (tables or {}).items():
        if not rows:
            continue
        header = list(rows[0])
        parts.append(f"<h2>{esc(name)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        for row in rows:
            cells = (f"{row.get(h):.4f}" if isinstance(row.get(h), float) else str(row.get(h, "")) for h in header)
            parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
    for name, image in images.items():
        if image.exists():
            encoded = base64.b64encode(image.read_bytes()).decode()
            parts.append(f"<h2>{esc(name)}</h2><img alt='{esc(name)}' src='data:image/png;base64,{encoded}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    write_json(path, summary)
