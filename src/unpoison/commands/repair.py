"""`unpoison repair`: remove a backdoor from a model the user brings, with D-BR.

D-BR (Chen et al. 2022) splits the untrusted training data into suspected-poisoned and
trusted-clean images (here by the `expand` detector, `scan`'s default; the paper's FCT with
`--set sd.scorer=fct`), then alternates unlearning the first with relearning the second. The model must be an unpoison model.pt (read with weights_only=True); the data is
the ImageFolder it was trained on (or one like it), with the model's class names.
Writes OUT/model.pt, OUT/suspects.csv, OUT/report.html, OUT/repair.json.

`--method ft|fp|nad|anp|mcr` repairs with a post-training baseline instead; these use only
a small folder of images known to be clean (`--clean DIR`, an ImageFolder with the model's
class names), never the untrusted data (which then only supplies the held-out split).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from ..cli import _key_values, add_held_out_options, add_overrides_option, add_paths, add_session_options

REPAIR_BASELINES = ("ft", "fp", "nad", "anp", "mcr")
OUTPUTS = ("model.pt", "suspects.csv", "suspects.png", "scores.png", "report.html", "repair.json", "skipped.txt")


def register(sub) -> None:
    p = sub.add_parser("repair", help="remove a backdoor from a trained model with D-BR",
                       description="Remove a backdoor from a model.pt with D-BR, using the untrusted "
                                   "ImageFolder it was trained on.")
    p.add_argument("--model", required=True, help="model.pt to repair, or the folder that holds it")
    add_paths(p, "ImageFolder the model was trained on (directory or archive)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the unlearn/relearn loop")
    p.add_argument("--method", default="dbr", choices=["dbr", *REPAIR_BASELINES],
                   help="dbr (default: uses the untrusted data) or a baseline that uses --clean only")
    p.add_argument("--clean", default=None,
                   help="ImageFolder of images known to be clean, for --method ft|fp|nad|anp|mcr "
                        "(every class; e.g. 5 %% of the training set)")
    add_held_out_options(p)
    p.add_argument("--split", default="auto", help="subfolder to use (default: train/ when present)")
    add_overrides_option(p, "defense_set", "override a D-BR setting, dotted for nested ones")
    add_session_options(p)
    p.set_defaults(func=cmd_repair)


def repair_method(method: str, clean_dir: str | None):
    """The method as `(repair(model, data, ctx, config), its Defense class)`: D-BR works on
    the untrusted data; a post-training baseline reads the --clean folder (with the model's
    classes) and is handed that folder only."""
    from pathlib import Path

    from ..console import UserError
    from ..data.untrusted import load_folder
    from ..defenses import DEFENSES
    from ..defenses.dbr import DBR, repair
    from ..defenses.posttraining import check_clean_reference

    if method == "dbr":
        return repair, DBR
    if clean_dir is None:
        raise UserError(f"--method {method} repairs with a small folder of images known to be clean: "
                        "pass --clean DIR (an ImageFolder with the model's class names)")
    path = Path(clean_dir).expanduser()
    if not path.exists():
        raise UserError(f"--clean {path} does not exist")
    defense_class = DEFENSES.get(method)

    def repair_with_clean_folder(model, data, ctx, config):
        clean = load_folder(path, None, data.image_size, classes=list(data.classes), what="clean")
        clean = check_clean_reference(clean, data.num_classes, config.min_clean, method.upper())
        return defense_class(config).repair(model, clean, ctx)

    return repair_with_clean_folder, defense_class


def cmd_repair(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import artifacts
    from ..artifacts import dataset_digest
    from ..config import apply_overrides
    from ..console import say
    from ..data.cache import hash_path
    from ..data.untrusted import check_paths, load_training_data, resize_policy
    from ..io import environment, write_json
    from ..monitor import HeldOutMonitor
    from ..profiles import get_profile
    from ..report import write_report
    from ..report.suspects import defense_suspects, summary_lines, write_suspect_files
    from ..runtime import Runtime
    from ..session import check_resume, prepare_out, user_context, write_skipped
    from .predict import load_user_model

    start = time.perf_counter()
    data_path, out = check_paths(args.data, args.out)
    repair, method_class = repair_method(args.method, args.clean)
    params = _key_values(args.defense_set)
    if args.epochs is not None:
        params[method_class.main_epochs] = args.epochs
    config = method_class.Config.for_profile(args.profile)
    if args.method == "dbr":
        # The user path splits by the detector `scan` uses (FCT ranks a noise blend backwards)
        # and trusts 20 % of every class; `--set sd.scorer=fct --set sd.clean_per_class=false`
        # is the paper's SD module.
        config = replace(config, sd=replace(config.sd, scorer="expand", clean_per_class=True))
    config = apply_overrides(config, params)
    profile = get_profile(args.profile)
    runtime = Runtime.create(args.device, args.precision, compile=args.compile)
    model, info = load_user_model(Path(args.model).expanduser(), runtime)
    architecture, classes, size = info["architecture"], list(info["classes"]), tuple(info["input_size"])
    prepare_out(out, args.resume, OUTPUTS)
    say(f"[repair] {profile.note}")
    say(f"[repair] {runtime.describe()}; model {architecture} with {len(classes)} classes")

    data = load_training_data(data_path, args.split, size, args.val_split, args.test, args.seed, classes=classes)
    write_skipped(out, data.skipped)
    check_resume(out, args.resume, {"command": "repair", "data": dataset_digest(data.train),
                                    "method": args.method, "clean": args.clean,
                                    "repaired_model": hash_path(Path(args.model).expanduser()),
                                    "config": _plain(config), "profile": args.profile, "seed": args.seed})
    unknown = [s for s in data.train.skipped if "not one of the known classes" in s]
    if unknown:
        say(f"[data] warning: {len(unknown)} images are in class folders the model does not know; "
            f"first: {unknown[0]}")
    monitor = HeldOutMonitor(data.held_out, runtime, out, args.seed)
    before = monitor.accuracy(model)
    if before is not None:
        say(f"[held-out] before repair: accuracy {before:.4f}")

    ctx = user_context(out, runtime, args.profile, args.seed, architecture, not args.no_progress,
                       not args.no_share, data.train)
    monitor.attach(ctx)
    result = repair(model, data.train, ctx, config)

    repaired = artifacts.unwrap(result.model)
    after = monitor.accuracy(repaired)
    scores, flagged, summary = defense_suspects(data.train, result.suspicion, result.flagged)
    record = {
        "command": "repair", "data": data.source, "defense": args.method, "clean": args.clean, "model": architecture,
        "repaired_model": str(args.model), "profile": args.profile, "profile_note": profile.note,
        "seed": args.seed, "n_train": len(data.train), "classes": classes,
        "class_sizes": dict(zip(classes, data.train.class_counts().tolist())), "held_out": data.held_out_source,
        "n_held_out": len(data.held_out) if data.held_out is not None else 0,
        "held_out_acc_before": before, "held_out_acc": after, "held_out_acc_by_stage": monitor.stages,
        "n_flagged": summary["n_flagged"] if summary else None,
        "flagged_concentrate_in": summary["concentrated_in"] if summary else None,
        "flagged_by_class": summary["classes"] if summary else None,
        "n_skipped": len(data.skipped), "warnings": data.warnings, "resize_policy": resize_policy(size),
        "stages": result.stages, "notes": result.notes,
        "defense_config": {"name": args.method, **_plain(config)}, "device": runtime.describe(),
        "environment": environment(), "wall_seconds": round(time.perf_counter() - start, 1),
    }
    metadata = {k: record[k] for k in ("command", "data", "repaired_model", "profile", "seed", "held_out",
                                       "held_out_acc_before", "held_out_acc", "resize_policy", "defense_config")}
    metadata["previous"] = info.get("metadata", {})
    artifacts.save_model(out / "model.pt", repaired, architecture, classes, size, metadata)
    write_suspect_files(out, data.train, scores, flagged)
    write_json(out / "repair.json", record)
    write_report(out)

    fmt = lambda v: f"{v:.4f}" if v is not None else "n/a"  # noqa: E731
    print(f"held-out accuracy: {fmt(before)} before, {fmt(after)} after repair ({data.held_out_source})")
    if summary is not None:
        for line in summary_lines(summary):
            print(line)
    print(f"wrote {out}/model.pt, {out}/suspects.csv, {out}/report.html")
    return 0


def _plain(config) -> dict:
    from ..config import to_plain

    plain = to_plain(config)
    return plain if isinstance(plain, dict) else {"config": str(plain)}
