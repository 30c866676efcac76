"""report.html: one run on one self-contained page (`page.py`; a user command's page is
`user_page.py`).

Sections of an `unpoison run` page, in reading order: what was run and what it measured; the trigger; CA/ASR
per stage and epoch; accuracy on poisoned vs clean training samples (DLP Fig. 1); the
detector's score histogram (FCT figure); the stages; the full configuration. A section
whose data the run did not record says why and how to get it instead of vanishing.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from ..io import atomic_write_text, read_jsonl
from . import figures
from .arrays import SCORES_FILE, TRIGGER_FILE, load_arrays
from .page import esc, figure, missing, page, table
from .tables import duration, finite, pct
from .user_page import USER_RECORDS, render_user_report

REPORT_FILE = "report.html"


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Render a finished folder to report.html: an `unpoison run` folder from its metrics.json
    (+ trigger.npz, scores.npz, log.jsonl), a `train` or `repair` folder from its train.json
    or repair.json (+ heldout.jsonl, scores.png, suspects.png)."""
    run_dir = Path(run_dir)
    target = Path(out) if out else run_dir / REPORT_FILE
    if (run_dir / "metrics.json").is_file():
        text = render_report(run_dir, json.loads((run_dir / "metrics.json").read_text()))
    else:
        record = next((run_dir / name for name in USER_RECORDS if (run_dir / name).is_file()), None)
        if record is None:
            raise FileNotFoundError(f"{run_dir / 'metrics.json'} not found: a report needs a finished "
                                    "`unpoison run`, `train` or `repair` folder")
        text = render_user_report(run_dir, json.loads(record.read_text()))
    atomic_write_text(target, text)
    return target


def render_report(run_dir: Path, metrics: dict[str, Any]) -> str:
    title = f"{metrics.get('attack')} vs {metrics.get('defense')}"
    sections = [
        ("summary", "Measurements", _summary),
        ("trigger", "The attack's trigger", _trigger),
        ("curves", "CA and ASR per stage and epoch", _curves),
        ("subsets", "Accuracy on poisoned vs clean training samples", _subsets),
        ("scores", "Suspicion scores of clean vs poisoned samples", _scores),
        ("stages", "Stages", _stages),
        ("config", "Configuration and environment", _config),
    ]
    subtitle = (f"{esc(metrics.get('dataset'))}, {esc(metrics.get('model'))}, profile {esc(metrics.get('profile'))}, "
                f"seed {esc(metrics.get('seed'))} &middot; {esc(metrics.get('profile_note', ''))}")
    return page(title, subtitle, [(anchor, heading, partial(make, run_dir, metrics))
                                  for anchor, heading, make in sections])


# ---------------------------------------------------------------------------- sections
def _summary(run_dir: Path, m: dict) -> str:
    rows = [("clean accuracy (CA)", pct(m.get("clean_acc")) + " %"),
            ("attack success rate (ASR)", _pct_or_na(m.get("asr"), m)),
            ("robust accuracy (RA)", _pct_or_na(m.get("robust_acc"), m)),
            ("training images / poisoned", f"{m.get('n_train')} / {m.get('n_poisoned')} (rate {m.get('poison_rate')}, "
                                           f"target {m.get('attack_config', {}).get('target', m.get('target'))})"),
            ("test images", m.get("n_test", "\u2014")),
            ("wall time", duration(m.get("wall_seconds"))),
            ("device", m.get("device", "\u2014"))]
    detection = m.get("detection")
    if detection:
        rows += [("detection AUROC", _num(detection.get("auroc"))),
                 ("detection TPR at 5 % FPR", pct(detection.get("tpr_at_fpr_5")) + " %"),
                 ("flagged samples", detection.get("n_flagged", "\u2014")),
                 ("precision / recall of the flagged set",
                  f"{pct(detection.get('precision'))} % / {pct(detection.get('recall'))} %")]
        if detection.get("n_trusted") is not None:
            rows.append(("poisoned samples in the trusted-clean set",
                         f"{detection['n_trusted_poisoned']} of {detection['n_trusted']}"))
    out = table(["measure", "value"], rows)
    if m.get("reused_models"):
        out += "<p>Reused from the model cache (identical data, recipe and seed): " + \
               ", ".join(esc(r) for r in m["reused_models"]) + "</p>"
    if m.get("notes"):
        out += "<ul>" + "".join(f"<li>{esc(n)}</li>" for n in m["notes"]) + "</ul>"
    return out


def _trigger(run_dir: Path, m: dict) -> str:
    if m.get("attack") == "none":
        return missing("The clean baseline has no attack, hence no trigger.")
    examples = load_arrays(run_dir / TRIGGER_FILE)
    if examples is None:
        return missing(f"{TRIGGER_FILE} is missing (runs before this report existed did not save it); "
                        "rerun the cell to see the trigger.")
    attack = m.get("attack_config", {})
    shown = ", ".join(f"{k}={v}" for k, v in attack.items() if k != "name")
    return figure(figures.trigger_figure(examples),
                   f"{m['attack']} ({shown}). Left: a training image before and after poisoning (the label "
                   "the model was given below). Right: a test image with the test-time trigger, as ASR "
                   "measures it. The difference is scaled up to full brightness to make faint triggers visible.")


def _curves(run_dir: Path, m: dict) -> str:
    log = _read_log(run_dir)
    if m.get("curves"):
        return figure(figures.curves_figure(m["curves"], log),
                       "Measured after every epoch on fixed random samples of the test set (the numbers of the "
                       "table above are on the whole test set). The defence never sees these measurements. "
                       "Dashed lines separate stages; below, each stage's training loss from log.jsonl.")
    stage_points = [s for s in m.get("stages", []) if finite(s.get("clean_acc"))]
    note = missing("No per-epoch curves: this run measured only after each stage (rerun with "
                    "`--monitor epochs`), or its models came from the model cache.")
    if stage_points:
        note += figure(figures.stage_metrics_figure(stage_points), "CA / ASR / RA after each stage.")
    return note


def _subsets(run_dir: Path, m: dict) -> str:
    curves = m.get("curves") or []
    if m.get("attack") == "none":
        return missing("The clean baseline has no poisoned training samples.")
    if not any(finite(r.get("train_acc_poison")) for r in curves):
        return missing("Needs per-epoch curves (`--monitor epochs`).")
    return figure(figures.subset_accuracy_figure(curves),
                   "Accuracy against the labels the model was trained on, on a fixed sample of poisoned and "
                   "of clean training images (the DLP paper's Figure 1: a backdoored network fits the "
                   "poisoned samples long before the clean ones).")


def _scores(run_dir: Path, m: dict) -> str:
    if not m.get("detection"):
        return missing(f"The defence {m.get('defense')!r} does not score training samples.")
    arrays = load_arrays(run_dir / SCORES_FILE)
    if arrays is None:
        return missing(f"{SCORES_FILE} is missing (runs before this report existed did not save it).")
    return figure(figures.scores_figure(arrays["scores"], arrays["is_poison"], m["detection"].get("auroc")),
                   "Each training sample's suspicion score from the defence, split by the ground truth "
                   "(which the defence never saw); the FCT paper shows the same picture for its metric.")


def _stages(run_dir: Path, m: dict) -> str:
    rows = [(s.get("name"), s.get("epochs"), duration(s.get("seconds")), pct(s.get("clean_acc")),
             pct(s.get("asr")), pct(s.get("robust_acc"))) for s in m.get("stages", [])]
    return table(["stage", "epochs", "time", "CA %", "ASR %", "RA %"], rows)


def _config(run_dir: Path, m: dict) -> str:
    parts = []
    for key in ("attack_config", "defense_config", "environment", "bench"):
        if key in m:
            parts.append(f"<details><summary>{esc(key)}</summary><pre>{esc(json.dumps(m[key], indent=2))}</pre></details>")
    return "".join(parts)


# ---------------------------------------------------------------------------- helpers
def _read_log(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "log.jsonl")
def _pct_or_na(value: Any, m: dict) -> str:
    if m.get("attack") == "none":
        return "\u2014 (no attack)"
    return pct(value) + " %"
def _num(value: Any) -> str:
    return f"{value:.4f}" if finite(value) else "\u2014"
