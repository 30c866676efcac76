"""`unpoison poison`: write a poisoned dataset to disk, with its ground truth and a picture.

OUT/train/<class>/<index>.png        the poisoned training set (labels as the attacker left them)
OUT/test/<class>/<index>.png         the clean test set
OUT/test_triggered/<class>/<index>.png  triggered test images filed under their TRUE class
                                     (all-to-one: only images whose true class is not the target)
OUT/manifest.json                    ground truth: which train files are poisoned, their original
                                     labels, the attack's full description, the target rule
OUT/preview.png                      clean / poisoned / amplified difference / test-time trigger

The poisoned set is exactly the one `unpoison run` trains on for the same dataset,
subset, seed and attack (same random draws, same cached reference models).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import shutil

import torch

from ..cli import _key_values, _position, add_architecture_option, add_runtime_options


def register(sub) -> None:
    p = sub.add_parser("poison", help="write a poisoned dataset (ImageFolder + ground-truth manifest + preview)",
                       description="Poison a dataset with an attack and write it to disk as PNG ImageFolders.")
    p.add_argument("--dataset", default="cifar10",
                   help="cifar10, gtsrb, or a folder/archive with train/<class>/* and test/<class>/*")
    p.add_argument("--attack", required=True, help="attack name (badnets, blended, sig, trojannn, lc, wanet)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data-root", default=None, help="folder with the datasets (default: $UNPOISON_DATA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the poison draw and of reference models")
    p.add_argument("--profile", default="quick", choices=["smoke", "quick", "paper"],
                   help="training recipe of reference models (TrojanNN, LC) (default: quick)")
    add_architecture_option(p, "architecture of reference models")
    p.add_argument("--train-subset", type=int, default=None, help="use N random training images")
    p.add_argument("--test-subset", type=int, default=None, help="use N random test images")
    p.add_argument("--preview", type=int, default=8, help="poisoned examples shown in preview.png (default 8)")
    g = p.add_argument_group("attack parameters")
    g.add_argument("--target", type=int, default=None, help="target class (default 0)")
    g.add_argument("--poison-rate", type=float, default=None, help="fraction of the training set (default 0.1)")
    g.add_argument("--attack-mode", choices=["all2one", "all2all"], default=None)
    g.add_argument("--trigger", default=None, help="trigger variant of the attack")
    g.add_argument("--trigger-size", type=int, default=None, help="patch side in pixels")
    g.add_argument("--trigger-pos", default=None, help="ROW,COL of the patch's top-left pixel")
    g.add_argument("--alpha", type=float, default=None, help="blend ratio of blended triggers")
    g.add_argument("--attack-param", action="append", metavar="KEY=VALUE", help="any other attack parameter")
    p.add_argument("--no-share", action="store_true", help="do not reuse cached reference models")
    add_runtime_options(p)
    p.set_defaults(func=cmd_poison)


def cmd_poison(args: argparse.Namespace) -> int:
    params = {"target": args.target, "rate": args.poison_rate, "mode": args.attack_mode, "trigger": args.trigger,
              "size": args.trigger_size, "position": _position(args.trigger_pos), "alpha": args.alpha,
              **_key_values(args.attack_param)}
    manifest = poison_to_disk(args.dataset, args.attack, {k: v for k, v in params.items() if v is not None},
                              Path(args.out), data_root=args.data_root, seed=args.seed, profile=args.profile,
                              model=args.model, train_subset=args.train_subset, test_subset=args.test_subset,
                              device=args.device, precision=args.precision, progress=not args.no_progress,
                              share_models=not args.no_share, preview=args.preview)
    print(f"wrote {args.out}: {manifest['n_train']} train images ({manifest['n_poisoned']} poisoned), "
          f"{manifest['n_test']} test, {manifest['n_test_triggered']} triggered test; manifest.json, preview.png",
          file=sys.stderr)
    return 0


def poison_to_disk(dataset: str, attack_name: str, attack_params: dict[str, Any], out: Path, *,
                   data_root: str | None = None, seed: int = 0, profile: str = "quick", model: str = "wrn16-1",
                   train_subset: int | None = None, test_subset: int | None = None, device: str = "auto",
                   precision: str = "auto", progress: bool = True, share_models: bool = True,
                   preview: int = 8) -> dict[str, Any]:
    from .. import artifacts
    from ..attacks import build_attack
    from ..context import DefenseContext
    from ..io import write_json
    from ..runtime import Runtime, generator

    train, test, source = _load(dataset, data_root, seed, train_subset, test_subset)
    attack = build_attack(attack_name, **attack_params)
    runtime = Runtime.create(device, precision)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".work"

    ctx = DefenseContext(runtime, profile, seed, model, work, progress=progress, log_path=work / "log.jsonl")
    # the cache `unpoison run` uses for the same clean data, so reference models are shared with it
    ctx.shared_model = artifacts.ModelCache.for_context(ctx, train, enabled=share_models).shared_model
    attack.prepare(train, ctx)
    poisoned = attack.poison(train, generator(seed, "poison"))
    backdoor_index = (torch.ones(len(test), dtype=torch.bool) if attack.mode == "all2all"
                      else test.labels != attack.target).nonzero().flatten()
    backdoor = attack.backdoor_test(test)

    folders = class_folders(train.classes)
    train_files = write_images(out / "train", poisoned.train.images, poisoned.train.labels, torch.arange(len(train)), folders)
    write_images(out / "test", test.images, test.labels, torch.arange(len(test)), folders)
    write_images(out / "test_triggered", backdoor.images, backdoor.true_labels, backdoor_index, folders)

    noise_index = getattr(attack, "noise_index", None)
    manifest = {
        "format": "unpoison-poisoned-dataset", "version": 1, "dataset": dataset, "source": source,
        "seed": seed, "profile": profile, "attack": attack.describe(),
        "target_rule": "y -> (y + 1) mod C" if attack.mode == "all2all" else f"all -> {attack.target}",
        "classes": list(train.classes), "class_folders": folders,
        "n_train": len(train), "n_poisoned": poisoned.n_poisoned, "n_test": len(test),
        "n_test_triggered": len(backdoor.images),
        "poison_rate_semantics": ("clean-label: rate * N target-class images (capped at the class size), labels kept"
                                  if attack.clean_label else
                                  "dirty-label: rate * N images from the non-target classes (all-to-all: all "
                                  "classes), relabelled"),
        "poisoned": [{"file": train_files[i], "index": i, "label": int(poisoned.train.labels[i]),
                      "original_label": int(poisoned.original_labels[i])} for i in poisoned.poison_index.tolist()],
        "test_triggered": "files are filed under their true class; the attack wants them classified as "
                          "the target rule says",
    }
    if noise_index is not None:
        manifest["noise_warped"] = [{"file": train_files[i], "index": i, "label": int(poisoned.train.labels[i])}
                                    for i in noise_index.tolist()]
    write_json(out / "manifest.json", manifest)
    write_preview(out / "preview.png", train, poisoned, attack, preview)
    shutil.rmtree(work / "checkpoints", ignore_errors=True)   # the reference model is cached, if shared
    return manifest


def _load(dataset: str, data_root: str | None, seed: int, train_subset: int | None, test_subset: int | None):
    from ..data import DATASETS, load_dataset, load_image_folder
    from ..runtime import generator

    if dataset in DATASETS:
        train, test, source = load_dataset(dataset, "train", data_root), load_dataset(dataset, "test", data_root), dataset
    else:
        path = Path(dataset)
        if not path.exists():
            raise ValueError(f"--dataset {dataset!r} is neither a known dataset ({', '.join(DATASETS)}) nor a folder")
        train = load_image_folder(path, "train")
        test = load_image_folder(path, "test", classes=train.classes)
        source = str(path.resolve())
    # the same subsets `unpoison run` draws for the same seed
    if train_subset:
        train = train.head(train_subset, generator(seed, "subset", "train"))
    if test_subset:
        test = test.head(test_subset, generator(seed, "subset", "test"))
    return train, test, source


def class_folders(classes: list[str]) -> list[str]:
    """Folder names that an ImageFolder reader (sorted names) maps back to the same labels."""
    if sorted(classes) == list(classes) and len(set(classes)) == len(classes):
        return [_safe_name(c) for c in classes]
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}_{_safe_name(c)}" for i, c in enumerate(classes)]


def _safe_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in name).strip(". ")
    return cleaned or "class"


def write_images(folder: Path, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 folders: list[str]) -> dict[int, str]:
    """PNG files <folder>/<class>/<index>.png; returns index -> path relative to the output root."""
    from PIL import Image

    width = max(5, len(str(int(index.max()) if len(index) else 0)))
    arrays = images.permute(0, 2, 3, 1).contiguous().numpy()
    files: dict[int, str] = {}
    for d in set(labels.tolist()):
        (folder / folders[d]).mkdir(parents=True, exist_ok=True)
    for array, label, i in zip(arrays, labels.tolist(), index.tolist()):
        relative = f"{folder.name}/{folders[label]}/{i:0{width}d}.png"
        Image.fromarray(array).save(folder.parent / relative, compress_level=1)
        files[i] = relative
    return files


def write_preview(path: Path, clean, poisoned, attack, count: int, scale: int = 4) -> None:
    """Columns of examples; rows: clean, poisoned training image, |difference| amplified so
    the largest change of each example is white, and the test-time trigger on the clean
    image (it differs from the training poison for SIG with test_delta and for LC)."""
    from PIL import Image, ImageDraw

    index = poisoned.poison_index[: max(count, 1)]
    if len(index) == 0:
        index = torch.arange(min(count, len(clean)))
    before = clean.images[index]
    after = poisoned.train.images[index]
    diff = (after.int() - before.int()).abs()
    peak = diff.flatten(1).amax(1).clamp(min=1)
    amplified = (diff * 255 // peak.view(-1, 1, 1, 1)).to(torch.uint8)
    test_time = attack.apply_trigger(before, train=False) if attack.name != "none" else before
    rows = [("clean", before), ("poisoned", after), ("|diff| (x255/max)", amplified), ("test trigger", test_time)]
    height, width = before.shape[-2:]
    tile_h, tile_w, label_w, caption_h = height * scale, width * scale, 130, 32
    canvas = Image.new("RGB", (label_w + len(index) * (tile_w + 4), caption_h + len(rows) * (tile_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    described = attack.describe()
    draw.text((4, 2), ", ".join(f"{k}={v}" for k, v in described.items()
                                if k in ("name", "target", "rate", "mode", "trigger", "alpha", "delta", "eps", "s"))[:200],
              fill="black")
    for r, (title, batch) in enumerate(rows):
        y = caption_h + r * (tile_h + 4)
        draw.text((4, y + tile_h // 2 - 6), title, fill="black")
        for c in range(len(index)):
            tile = Image.fromarray(batch[c].permute(1, 2, 0).numpy()).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (tile_w + 4), y))
    for c, i in enumerate(index.tolist()):   # original label -> label in the poisoned set
        draw.text((label_w + c * (tile_w + 4) + 2, 17),
                  f"{int(poisoned.original_labels[i])}->{int(poisoned.train.labels[i])}", fill="red")
    canvas.save(path)
