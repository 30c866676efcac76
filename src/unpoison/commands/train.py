"""`unpoison train`: a model that resists the backdoor, from an untrusted ImageFolder.

Writes OUT/model.pt (state dict + plain metadata, loadable with weights_only=True),
OUT/suspects.csv (what the defence set aside, most suspicious first), OUT/report.html,
OUT/train.json; accuracy is measured on held-out images only (`--test DIR`, the folder's
own test/, or a stratified `--val-split`), since a user's run has no ground truth.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..cli import (_key_values, add_held_out_options, add_input_options, add_overrides_option, add_session_options,
                   add_untrusted_folder_options)

OUTPUTS = ("model.pt", "suspects.csv", "suspects.png", "scores.png", "report.html", "train.json", "skipped.txt")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a backdoor-resistant model on an untrusted ImageFolder",
                       description="Train a model that resists a backdoor hidden in an untrusted ImageFolder "
                                   "(DIR/<class>/<image>, a directory or a .tar.gz).")
    add_untrusted_folder_options(p, "--defense", "quarantine",
                                 "quarantine (default, recommended), dlp, cbd, dst, dbr, abl, none ...")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the defence's main training stage")
    add_held_out_options(p)
    add_input_options(p, "train on")
    add_overrides_option(p, "defense_set",
                         "override a defence setting, dotted for nested ones (e.g. train.optim.lr=0.05)")
    add_session_options(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .. import artifacts
    from ..artifacts import dataset_digest
    from ..console import say
    from ..data.untrusted import check_paths, load_training_data, resize_policy
    from ..defenses import DEFENSES, build_defense
    from ..io import environment, write_json
    from ..monitor import HeldOutMonitor
    from ..profiles import get_profile
    from ..report import write_report
    from ..report.suspects import defense_suspects, write_suspect_files
    from ..runtime import Runtime
    from ..session import check_resume, prepare_out, user_context, write_skipped

    start = time.perf_counter()
    data_path, out = check_paths(args.data, args.out)
    params = _key_values(args.defense_set)
    if args.epochs is not None:
        params[DEFENSES.get(args.defense).main_epochs] = args.epochs
    defense = build_defense(args.defense, args.profile, args.model, **params)
    profile = get_profile(args.profile)
    runtime = Runtime.create(args.device, args.precision, compile=args.compile)
    prepare_out(out, args.resume, OUTPUTS)
    say(f"[train] {profile.note}")
    say(f"[train] {runtime.describe()}")

    data = load_training_data(data_path, args.split, args.image_size, args.val_split, args.test, args.seed)
    write_skipped(out, data.skipped)
    check_resume(out, args.resume, {"command": "train", "data": dataset_digest(data.train),
                                    "defense": defense.describe(), "model": args.model,
                                    "profile": args.profile, "seed": args.seed})
    ctx = user_context(out, runtime, args.profile, args.seed, args.model, not args.no_progress,
                       not args.no_share, data.train)
    monitor = HeldOutMonitor(data.held_out, runtime, out, args.seed)
    monitor.attach(ctx)

    result = defense.fit(data.train, ctx)

    model = artifacts.unwrap(result.model)
    held_out_acc = monitor.accuracy(model)
    scores, flagged, summary = defense_suspects(data.train, result.suspicion, result.flagged)
    record = {
        "command": "train", "data": data.source, "defense": args.defense, "model": args.model,
        "profile": args.profile, "profile_note": profile.note, "seed": args.seed, "n_train": len(data.train),
        "classes": data.train.classes,
        "class_sizes": dict(zip(data.train.classes, data.train.class_counts().tolist())),
        "held_out": data.held_out_source,
        "n_held_out": len(data.held_out) if data.held_out is not None else 0, "held_out_acc": held_out_acc,
        "held_out_acc_by_stage": monitor.stages, "n_flagged": summary["n_flagged"] if summary else None,
        "flagged_concentrate_in": summary["concentrated_in"] if summary else None,
        "flagged_by_class": summary["classes"] if summary else None,
        "n_skipped": len(data.skipped), "warnings": data.warnings, "resize_policy": resize_policy(data.image_size),
        "stages": result.stages, "notes": result.notes, "defense_config": defense.describe(),
        "device": runtime.describe(), "environment": environment(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    metadata = {k: record[k] for k in ("command", "data", "defense", "profile", "seed", "n_train", "held_out",
                                    "held_out_acc", "resize_policy", "defense_config")}
    artifacts.save_model(out / "model.pt", model, args.model, data.train.classes, data.image_size, metadata)
    write_suspect_files(out, data.train, scores, flagged)
    write_json(out / "train.json", record)
    write_report(out)

    for line in plain_summary(record, summary, out, args.defense):
        print(line)
    return 0


def plain_summary(record: dict, summary: dict | None, out: Path, defense: str) -> list[str]:
    """What the defence did, in a user's words: images set aside and where they concentrate,
    what each stage concluded, the time against plain training, and where the outputs are."""
    from ..report.suspects import summary_lines

    wall = record["wall_seconds"]
    lines = [f"[{defense}] done in {_minutes(wall)}."]
    plain = plain_training_seconds(record["stages"], record["n_train"])
    if plain:
        lines[0] += (f" Plain training of the same model would take about {_minutes(plain)} (estimated from this "
                     f"run's training stage): the defence cost {wall / plain:.1f}x that.")
    if summary is not None:
        lines += summary_lines(summary)
    else:
        lines.append(f"the {defense} defence ranks no images: suspects.csv lists them unscored")
    lines += [f"- {note}" for note in record.get("notes", [])]
    acc = record["held_out_acc"]
    lines.append(f"held-out accuracy: {acc:.4f} ({record['held_out']})" if acc is not None
                 else "held-out accuracy: n/a (no held-out images; use --test DIR or --val-split)")
    lines.append(f"the model: {out}/model.pt; every image ranked, most suspicious first: {out}/suspects.csv; "
                 f"the report (open in a browser): {out}/report.html")
    return lines


def plain_training_seconds(stages: list[dict], n_train: int) -> float | None:
    """Seconds plain training would take, from a stage named "train" (scaled to the whole set
    when the stage trained on part of it), or None when the defence has no such stage."""
    for stage in stages:
        if stage.get("name") == "train" and stage.get("seconds"):
            return stage["seconds"] * n_train / max(1, stage.get("images_per_epoch", n_train))
    return None


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

