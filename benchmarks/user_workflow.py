"""Measure the user workflow as a new user would meet it, against the ground truth that
`unpoison poison` keeps in manifest.json (which the workflow itself never reads).

    python benchmarks/user_workflow.py recall --poisoned DIR --suspects OUT/suspects.csv
        share of the poisoned training images inside scan's flagged set, and the flagged-set size
    python benchmarks/user_workflow.py asr --poisoned DIR --preds preds.csv
        attack success rate on DIR/test_triggered: the fraction of triggered images (true class
        not the target) that the model labels as the target
    python benchmarks/user_workflow.py accuracy --preds preds.csv
        accuracy of predictions on an ImageFolder whose class folders are the true labels

Each prints one JSON line; --json FILE also writes it there.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def manifest(poisoned: Path) -> dict:
    return json.loads((poisoned / "manifest.json").read_text())


def scan_recall(poisoned: Path, suspects: Path) -> dict:
    truth = {entry["file"] for entry in manifest(poisoned)["poisoned"]}
    rows = read_rows(suspects)
    flagged = {r["path"] for r in rows if r["flagged"] == "1"}
    # suspects.csv paths are relative to the folder scanned: DIR (train/...) or DIR/train (...)
    if truth and not truth & {r["path"] for r in rows}:
        flagged = {f"train/{p}" for p in flagged}
    hits = len(flagged & truth)
    return {"n": len(rows), "n_poisoned": len(truth), "n_flagged": len(flagged),
            "flagged_fraction": len(flagged) / max(len(rows), 1), "recall": hits / max(len(truth), 1),
            "precision": hits / max(len(flagged), 1)}


def attack_success(poisoned: Path, preds: Path) -> dict:
    info = manifest(poisoned)
    rule = info["target_rule"]
    if not rule.startswith("all -> "):
        raise SystemExit(f"only all-to-one attacks are measured here (target rule: {rule})")
    target = int(rule.split("->")[1])
    classes, folders = info["classes"], info["class_folders"]
    rows = [r for r in read_rows(preds) if _true_class(r["path"], folders) not in (None, target)]
    hits = sum(int(r["pred"]) == target for r in rows)
    return {"target": target, "target_class": classes[target], "n_triggered": len(rows),
            "asr": hits / max(len(rows), 1)}


def accuracy(preds: Path, folders: list[str] | None = None) -> dict:
    rows = read_rows(preds)
    correct = total = 0
    for r in rows:
        parts = Path(r["path"]).parts
        folder = parts[-2] if len(parts) >= 2 else None
        if folder is None:
            continue
        total += 1
        correct += (r["class_name"] == folder) if folders is None else (folders.index(folder) == int(r["pred"]))
    return {"n": total, "accuracy": correct / max(total, 1)}


def _true_class(path: str, folders: list[str]) -> int | None:
    parts = Path(path).parts
    return folders.index(parts[-2]) if len(parts) >= 2 and parts[-2] in folders else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("recall")
    r.add_argument("--poisoned", required=True, type=Path)
    r.add_argument("--suspects", required=True, type=Path)
    a = sub.add_parser("asr")
    a.add_argument("--poisoned", required=True, type=Path)
    a.add_argument("--preds", required=True, type=Path)
    c = sub.add_parser("accuracy")
    c.add_argument("--poisoned", type=Path, default=None, help="to map class folders to labels")
    c.add_argument("--preds", required=True, type=Path)
    for p in (r, a, c):
        p.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.what == "recall":
        result = scan_recall(args.poisoned, args.suspects)
    elif args.what == "asr":
        result = attack_success(args.poisoned, args.preds)
    else:
        result = accuracy(args.preds, manifest(args.poisoned)["class_folders"] if args.poisoned else None)
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
