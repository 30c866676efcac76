"""`unpoison report RUN_DIR...`: (re)write each run folder's self-contained report.html."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html from a finished run",
                       description="Render a run folder (metrics.json, trigger.npz, scores.npz, log.jsonl; or the "
                                   "train.json / repair.json of `unpoison train` / `repair`) to a self-contained "
                                   "report.html that opens offline.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="folders written by `unpoison run`, `train` or `repair`")
    p.add_argument("--out", default=None, help="output file (only with one RUN_DIR; default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    if args.out and len(args.run_dirs) > 1:
        raise SystemExit("--out takes one RUN_DIR; without it each report goes to its RUN_DIR")
    failed = 0
    for run_dir in args.run_dirs:
        try:
            print(f"wrote {write_report(run_dir, args.out)}", file=sys.stderr)
        except FileNotFoundError as exc:
            print(f"unpoison: error: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
