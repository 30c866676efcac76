"""report.html: one run on one self-contained page (figures embedded as base64 PNG).

Sections, in reading order: what was run and what it measured; the trigger; CA/ASR
per stage and epoch; accuracy on poisoned vs clean training samples (DLP Fig. 1); the
detector's score histogram (FCT figure); the stages; the full configuration. A section
whose data the run did not record says why and how to get it instead of vanishing.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Callable

from ..io import atomic_write_text
from . import figures
from .arrays import SCORES_FILE, TRIGGER_FILE, load_arrays
from .tables import duration, finite, pct

REPORT_FILE = "report.html"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1000px;
       padding: 0 1em; color: #1d1d1f; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #555; margin-top: 0; } .missing { color: #8a5a00; background: #fff7e0; padding: 0.5em 0.8em; }
#broken { color: #fff; background: #b00020; padding: 0.5em 0.8em; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""

# Marks the page when an embedded figure fails to decode, visibly and in the DOM
# (body[data-images-loaded]), which is what the headless-Chromium check reads.
SELF_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  document.body.setAttribute('data-images-loaded', (images.length - broken.length) + '/' + images.length);
  if (broken.length) {
    var banner = document.getElementById('broken');
    banner.textContent = broken.length + ' figure(s) on this page failed to load';
    banner.hidden = false;
  }
});
"""


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Render RUN_DIR/metrics.json (+ trigger.npz, scores.npz, log.jsonl) to report.html."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: a report needs a finished `unpoison run` folder")
    metrics = json.loads(metrics_path.read_text())
    target = Path(out) if out else run_dir / REPORT_FILE
    atomic_write_text(target, render_report(run_dir, metrics))
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
    body = [f"<h1>{_e(title)}</h1>",
            f"<p class='sub'>{_e(metrics.get('dataset'))}, {_e(metrics.get('model'))}, profile "
            f"{_e(metrics.get('profile'))}, seed {_e(metrics.get('seed'))} &middot; {_e(metrics.get('profile_note', ''))}</p>",
            "<p id='broken' hidden></p>"]
    for anchor, heading, make in sections:
        body.append(f"<section id='{anchor}'><h2>{_e(heading)}</h2>{_guarded(make, run_dir, metrics)}</section>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>unpoison: {_e(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{SELF_CHECK}</script>\n</body></html>\n")


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
    out = _table(["measure", "value"], rows)
    if m.get("reused_models"):
        out += "<p>Reused from the model cache (identical data, recipe and seed): " + \
               ", ".join(_e(r) for r in m["reused_models"]) + "</p>"
    if m.get("notes"):
        out += "<ul>" + "".join(f"<li>{_e(n)}</li>" for n in m["notes"]) + "</ul>"
    return out


def _trigger(run_dir: Path, m: dict) -> str:
    if m.get("attack") == "none":
        return _missing("The clean baseline has no attack, hence no trigger.")
    examples = load_arrays(run_dir / TRIGGER_FILE)
    if examples is None:
        return _missing(f"{TRIGGER_FILE} is missing (runs before this report existed did not save it); "
                        "rerun the cell to see the trigger.")
    attack = m.get("attack_config", {})
    shown = ", ".join(f"{k}={v}" for k, v in attack.items() if k != "name")
    return _figure(figures.trigger_figure(examples),
                   f"{m['attack']} ({shown}). Left: a training image before and after poisoning (the label "
                   "the model was given below). Right: a test image with the test-time trigger, as ASR "
                   "measures it. The difference is scaled up to full brightness to make faint triggers visible.")


def _curves(run_dir: Path, m: dict) -> str:
    log = _read_log(run_dir)
    if m.get("curves"):
        return _figure(figures.curves_figure(m["curves"], log),
                       "Measured after every epoch on fixed random samples of the test set (the numbers of the "
                       "table above are on the whole test set). The defence never sees these measurements. "
                       "Dashed lines separate stages; below, each stage's training loss from log.jsonl.")
    stage_points = [s for s in m.get("stages", []) if finite(s.get("clean_acc"))]
    note = _missing("No per-epoch curves: this run measured only after each stage (rerun with "
                    "`--monitor epochs`), or its models came from the model cache.")
    if stage_points:
        note += _figure(figures.stage_metrics_figure(stage_points), "CA / ASR / RA after each stage.")
    return note


def _subsets(run_dir: Path, m: dict) -> str:
    curves = m.get("curves") or []
    if m.get("attack") == "none":
        return _missing("The clean baseline has no poisoned training samples.")
    if not any(finite(r.get("train_acc_poison")) for r in curves):
        return _missing("Needs per-epoch curves (`--monitor epochs`).")
    return _figure(figures.subset_accuracy_figure(curves),
                   "Accuracy against the labels the model was trained on, on a fixed sample of poisoned and "
                   "of clean training images (the DLP paper's Figure 1: a backdoored network fits the "
                   "poisoned samples long before the clean ones).")


def _scores(run_dir: Path, m: dict) -> str:
    if not m.get("detection"):
        return _missing(f"The defence {m.get('defense')!r} does not score training samples.")
    arrays = load_arrays(run_dir / SCORES_FILE)
    if arrays is None:
        return _missing(f"{SCORES_FILE} is missing (runs before this report existed did not save it).")
    return _figure(figures.scores_figure(arrays["scores"], arrays["is_poison"], m["detection"].get("auroc")),
                   "Each training sample's suspicion score from the defence, split by the ground truth "
                   "(which the defence never saw); the FCT paper shows the same picture for its metric.")


def _stages(run_dir: Path, m: dict) -> str:
    rows = [(s.get("name"), s.get("epochs"), duration(s.get("seconds")), pct(s.get("clean_acc")),
             pct(s.get("asr")), pct(s.get("robust_acc"))) for s in m.get("stages", [])]
    return _table(["stage", "epochs", "time", "CA %", "ASR %", "RA %"], rows)


def _config(run_dir: Path, m: dict) -> str:
    parts = []
    for key in ("attack_config", "defense_config", "environment", "bench"):
        if key in m:
            parts.append(f"<details><summary>{_e(key)}</summary><pre>{_e(json.dumps(m[key], indent=2))}</pre></details>")
    return "".join(parts)


# ---------------------------------------------------------------------------- helpers
def _guarded(make: Callable[[Path, dict], str], run_dir: Path, metrics: dict) -> str:
    """One broken section (an odd metrics.json, a drawing error) must not cost the whole page."""
    try:
        return make(run_dir, metrics)
    except Exception as exc:
        return _missing(f"this section could not be drawn: {type(exc).__name__}: {exc}")


def _read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return records


def _figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{_e(caption[:80])}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[tuple]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _td(value: Any) -> str:
    text = _e(value)
    numeric = text.replace(".", "").replace(" %", "").replace(" ", "").isdigit()
    return f"<td class='num'>{text}</td>" if numeric else f"<td>{text}</td>"


def _missing(text: str) -> str:
    return f"<p class='missing'>{_e(text)}</p>"


def _pct_or_na(value: Any, m: dict) -> str:
    if m.get("attack") == "none":
        return "\u2014 (no attack)"
    return pct(value) + " %"


def _num(value: Any) -> str:
    return f"{value:.4f}" if finite(value) else "\u2014"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)
