"""`unpoison scan`: rank every image of an untrusted ImageFolder by how likely it is poisoned.

Writes OUT/suspects.csv (path,label,score,flagged; most suspicious first), OUT/suspects.png
(the most suspicious images with their labels), OUT/scan.json, and prints a summary: how
many were flagged and which classes they concentrate in.
"""

from __future__ import annotations

import argparse
import time

from ..cli import (_key_values, add_input_options, add_overrides_option, add_session_options,
                   add_untrusted_folder_options)

OUTPUTS = ("suspects.csv", "suspects.png", "scan.json", "skipped.txt")


def register(sub) -> None:
    p = sub.add_parser("scan", help="rank the images of an untrusted ImageFolder by suspicion: OUT/suspects.csv",
                       description="Train what a detector needs on an untrusted ImageFolder (DIR/<class>/<image>, "
                                   "a directory or a .tar.gz) and rank every image by how likely it is poisoned.")
    add_untrusted_folder_options(
        p, "--detector", "expand",
        "expand (default: entropy seeds expanded by feature similarity), fct, entropy, loss or spectral",
        model_what="architecture the detector trains")
    p.add_argument("--flag-fraction", type=float, default=None,
                   help="flag this fraction of the images, most suspicious first (default: the detector's own rule)")
    p.add_argument("--top", type=int, default=64, help="images in suspects.png (default 64)")
    add_input_options(p, "read")
    add_overrides_option(p, "detector_set", "override a detector setting, dotted for nested ones")
    add_session_options(p)
    p.set_defaults(func=cmd_scan)


def cmd_scan(args: argparse.Namespace) -> int:
    from ..artifacts import dataset_digest
    from ..console import say
    from ..data.checks import check_classes
    from ..data.untrusted import check_paths, detect_split, load_folder, resize_policy
    from ..detect import build_detector
    from ..io import write_json
    from ..profiles import get_profile
    from ..report.suspects import flag_summary, flag_top, save_suspect_grid, summary_lines, write_suspects
    from ..runtime import Runtime
    from ..session import check_resume, prepare_out, user_context, write_skipped

    start = time.perf_counter()
    data_path, out = check_paths(args.data, args.out)
    detector = build_detector(args.detector, args.profile, args.model,
                              **_key_values(args.detector_set))
    profile = get_profile(args.profile)
    runtime = Runtime.create(args.device, args.precision, compile=args.compile)
    prepare_out(out, args.resume, OUTPUTS)
    say(f"[scan] {profile.note}")
    say(f"[scan] {runtime.describe()}")

    size = (args.image_size, args.image_size)
    split = detect_split(data_path, args.split)
    checked = check_classes(load_folder(data_path, split, size, what="data"))
    data = checked.data
    write_skipped(out, data.skipped)
    check_resume(out, args.resume, {"command": "scan", "data": dataset_digest(data),
                                    "detector": detector.describe(), "model": args.model,
                                    "profile": args.profile, "seed": args.seed})

    ctx = user_context(out, runtime, args.profile, args.seed, args.model, not args.no_progress,
                       not args.no_share, data)
    detection = detector.detect(data, ctx)
    scores = detection.scores.detach().float().cpu()
    if args.flag_fraction is not None:
        flagged, rule = flag_top(scores, args.flag_fraction), f"the {args.flag_fraction:.1%} highest scores"
    elif detection.flagged is not None:
        flagged = detection.flagged.bool().cpu()
        rule = detection.info.get("flagging_rule", f"the {detector.name} detector's own rule")
    else:
        flagged, rule = flag_top(scores, 0.1), "the 10% highest scores (the detector has no rule of its own)"

    write_suspects(out / "suspects.csv", data, scores, flagged)
    save_suspect_grid(out / "suspects.png", data, scores, flagged, args.top)
    summary = flag_summary(data, flagged)
    pictures = ["suspects.png"]
    if summary["concentrated_in"] is not None:
        # a detector's very top can be clean outliers of every class (FCT on BadNets: the
        # first poisoned image at rank 52); the suspected target class's own top is clearer
        save_suspect_grid(out / "suspects_in_class.png", data, scores, flagged, args.top,
                             only_label=data.classes.index(summary["concentrated_in"]))
        pictures.append("suspects_in_class.png")
    record = {
        "command": "scan", "data": str(data_path) + (f"/{split}" if split else ""), "detector": detector.describe(),
        "profile": args.profile, "profile_note": profile.note, "model": args.model, "seed": args.seed,
        "flagging_rule": rule, **summary, "n_skipped": len(data.skipped), "warnings": checked.warnings,
        "resize_policy": resize_policy(size), "stages": detection.stages, "device": runtime.describe(),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    write_json(out / "scan.json", record)
    for line in summary_lines(summary):
        print(line)
    print(f"flagging rule: {rule}")
    print(f"wrote {out}/suspects.csv, " + ", ".join(f"{out}/{p}" for p in pictures) + f", {out}/scan.json")
    return 0

