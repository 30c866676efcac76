"""report.html of a user command (`train`, `repair`): there is no ground truth, so the page
shows what the user can check: accuracy on held-out images per stage and epoch, where
the flagged images concentrate, the score histogram and the most suspicious images."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from ..io import read_jsonl
from .page import esc, figure, missing, page, table

USER_RECORDS = ("train.json", "repair.json")   # what `train` and `repair` record, beside report.html
HELD_OUT_JOURNAL = "heldout.jsonl"
SUMMARY_KEYS = ("data", "defense", "repaired_model", "model", "profile", "seed", "n_train", "held_out",
                "held_out_acc_before", "held_out_acc", "n_flagged", "flagged_concentrate_in", "n_skipped",
                "resize_policy", "wall_seconds", "device")
PICTURES = (("scores", "Suspicion scores", "scores.png"), ("suspects", "Most suspicious images", "suspects.png"))


def held_out_curves(out: Path) -> list[dict]:
    """Held-out accuracy per epoch from OUT/heldout.jsonl; an epoch trained again after a
    resume replaces its earlier record."""
    latest = {(r["stage"], r["epoch"]): r for r in read_jsonl(out / HELD_OUT_JOURNAL)}
    return list(latest.values())


def render_user_report(out: Path, record: dict[str, Any]) -> str:
    title = f"unpoison {record.get('command')}: {record.get('defense')}"
    subtitle = esc(record.get("profile_note", ""))
    sections = [("summary", "Summary", lambda: _summary(record)),
                ("stages", "Stages", lambda: _stages(record)),
                ("curves", "Held-out accuracy per epoch", lambda: _curves(out)),
                ("classes", "Classes (most flagged first)", lambda: _classes(record))]
    sections += [(anchor, heading, partial(_picture, out / name, heading))
                 for anchor, heading, name in PICTURES if (out / name).is_file()]
    sections.append(("notes", "Notes", lambda: _notes(record)))
    return page(title, subtitle, sections)


def _summary(record: dict) -> str:
    return table(["measure", "value"], [(key, _shown(record[key])) for key in SUMMARY_KEYS if key in record])


def _stages(record: dict) -> str:
    # a stage may train a helper model (a detector's): its accuracy is that model's
    by_stage = record.get("held_out_acc_by_stage", {})
    rows = [(s.get("name"), _shown(s.get("seconds")), s.get("epochs"), _shown(by_stage.get(s.get("name"))))
            for s in record.get("stages", [])]
    return table(["stage", "seconds", "epochs", "held-out accuracy of the stage's model"], rows)


def _curves(out: Path) -> str:
    curves = held_out_curves(out)
    if not curves:
        return missing("No per-epoch measurements: there were no held-out images, or every model came from the "
                       "model cache.")
    return table(["stage", "epoch", "held-out accuracy"],
                 [(c.get("stage"), c.get("epoch"), _shown(c.get("held_out_acc"))) for c in curves])


def _classes(record: dict) -> str:
    flagged = record.get("flagged_by_class")
    if flagged:
        return table(["class", "training images", "flagged", "share of flagged"],
                     [(c["class"], c["size"], c["flagged"], _shown(c["share_of_flagged"])) for c in flagged])
    return table(["class", "training images"], list(record.get("class_sizes", {}).items()))


def _picture(path: Path, heading: str) -> str:
    return figure(path.read_bytes(), heading)


def _notes(record: dict) -> str:
    notes = [n for n in [*record.get("warnings", []), *record.get("notes", [])] if n]
    return "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>" if notes else "<p>none</p>"


def _shown(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "" if value is None else str(value)
