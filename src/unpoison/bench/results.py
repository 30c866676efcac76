"""The tables of a finished grid: results.csv (one row per cell), results.md (mean +- std
over seeds, with the commands, machines and versions that produced them) and the plots."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..attacks.base import DEFAULT_RATE
from ..io import atomic_write_bytes, atomic_write_text, write_csv
from ..report import tables
from .execute import cell_dir, stored_result
from .grid import Cell, Grid

ROW_FIELDS = ("cell", "dataset", "model", "attack", "defense", "seed", "profile", "attack_name", "defense_name",
              "n_train", "n_poisoned", "clean_acc", "asr", "robust_acc", "auroc", "tpr_at_fpr_5",
              "recall_at_10_percent", "precision", "recall", "n_flagged", "n_trusted_poisoned", "wall_seconds", "device")


def collect(out: str | Path, grid: Grid) -> tuple[list[dict], list[Cell]]:
    """(finished results in grid order, cells not finished) of a bench folder."""
    results, missing = [], []
    for cell in grid.cells():
        metrics = stored_result(cell_dir(Path(out), cell) / "metrics.json", cell)
        if metrics is None:
            missing.append(cell)
        else:
            results.append(metrics)
    return results, missing


def nonstandard_rate(metrics: dict) -> float | None:
    """The run's poison rate when it is not the papers' standard one (None otherwise)."""
    rate = metrics.get("poison_rate")
    if metrics.get("attack") in (None, "none") or rate is None or abs(rate - DEFAULT_RATE) < 1e-9:
        return None
    return rate


def flat_row(metrics: dict) -> dict[str, Any]:
    """One results.csv row: the cell's labels and measurements (fractions, not percent)."""
    spec = metrics.get("bench", {}).get("spec", {})
    detection = metrics.get("detection") or {}
    # a detection-only run (`run --detector`) is its own row, never averaged into the defence's
    label = f"{metrics['detector']} (detector only)" if metrics.get("detector") else metrics.get("defense")
    attack = metrics.get("attack")
    if nonstandard_rate(metrics) is not None:
        attack = f"{attack} (rate {nonstandard_rate(metrics):g})"   # never averaged with the standard-rate cell
    row = {"cell": metrics.get("bench", {}).get("cell"), "attack": spec.get("attack", attack),
           "defense": spec.get("defense", label), "attack_name": metrics.get("attack"),
           "defense_name": metrics.get("defense")}
    for key in ("dataset", "model", "seed", "profile", "n_train", "n_poisoned", "clean_acc", "asr", "robust_acc",
                "wall_seconds", "device"):
        row[key] = metrics.get(key)
    for key in ("auroc", "tpr_at_fpr_5", "recall_at_10_percent", "precision", "recall", "n_flagged",
                "n_trusted_poisoned"):
        row[key] = detection.get(key)
    return row


def summarize(results: Iterable[dict]) -> list[dict]:
    """Mean and std over seeds per (dataset, model, profile, attack, defence), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for metrics in results:
        row = flat_row(metrics)
        groups.setdefault((row["dataset"], row["model"], row["profile"], row["attack"], row["defense"]), []).append(row)
    summary = []
    for (dataset, model, profile, attack, defense), rows in groups.items():
        entry = {"dataset": dataset, "model": model, "profile": profile, "attack": attack, "defense": defense,
                 "seeds": [r["seed"] for r in rows], "n": len(rows)}
        for key in ("clean_acc", "asr", "robust_acc", "auroc", "precision", "wall_seconds"):
            entry[f"{key}_mean"], entry[f"{key}_std"] = tables.mean_std(r[key] for r in rows)
        summary.append(entry)
    return summary


def summary_table(summary: Sequence[dict]) -> str:
    rows = [(s["attack"], s["defense"], ",".join(map(str, s["seeds"])),
             tables.pct_pm(s["clean_acc_mean"], s["clean_acc_std"]), tables.pct_pm(s["asr_mean"], s["asr_std"]),
             tables.pct_pm(s["robust_acc_mean"], s["robust_acc_std"]), tables.num_pm(s["auroc_mean"], s["auroc_std"]),
             tables.num_pm(s["precision_mean"], s["precision_std"]),
             tables.duration(s["wall_seconds_mean"])) for s in summary]
    return tables.markdown_table(["attack", "defence", "seeds", "CA %", "ASR %", "RA %", "detection AUROC",
                                  "flagged precision", "wall time / seed"], rows)


def write_tables(out: str | Path, grid: Grid, plots: bool = True) -> dict[str, Any]:
    """OUT/results.csv (one row per finished cell), OUT/results.md (mean +- std over seeds,
    per dataset and model) and OUT/plots/*.png."""
    from ..report import figures

    out = Path(out)
    results, missing = collect(out, grid)
    rows = [flat_row(m) for m in results]
    write_csv(out / "results.csv", list(ROW_FIELDS), [[_csv(r[k]) for k in ROW_FIELDS] for r in rows])
    summary = summarize(results)
    lines = [f"# Benchmark `{grid.name}`\n",
             f"Grid `{grid.source}`: {len(results)} of {len(results) + len(missing)} cells finished.\n"]
    lines += provenance(results)
    for (dataset, model, profile), part in split_by_setting(summary).items():
        lines.append(f"\n## {dataset}, {model}, profile {profile}\n")
        lines.append(summary_table(part))
        if plots:
            stem = f"{dataset}-{model}-{profile}"
            (out / "plots").mkdir(exist_ok=True)
            atomic_write_bytes(out / "plots" / f"{stem}-bars.png", figures.bench_bars_figure(part, f"{dataset}, {model}"))
            atomic_write_bytes(out / "plots" / f"{stem}-tradeoff.png",
                               figures.bench_tradeoff_figure(part, f"{dataset}, {model}"))
            lines.append(f"\n![CA and ASR per attack and defence](plots/{stem}-bars.png)\n"
                         f"![ASR against CA](plots/{stem}-tradeoff.png)\n")
    if missing:
        lines.append("\n## Not finished\n\n" + "\n".join(f"- `{c.id}`" for c in missing) + "\n")
    atomic_write_text(out / "results.md", "\n".join(lines))
    return {"finished": len(results), "missing": [c.id for c in missing], "summary": summary}


def command_template(metrics: dict) -> str:
    """A cell's recorded command with its attack and defence written as <attack>/<defense>,
    so a grid's cells share one line of provenance instead of one line each."""
    command = metrics.get("bench", {}).get("command") or ""
    attack, defense = metrics.get("attack"), metrics.get("defense")
    if not command or not attack or not defense:
        return command
    command = re.sub(rf"--attack {re.escape(attack)}(?=\s|$)", "--attack <attack>", command)
    command = re.sub(rf"--defense {re.escape(defense)}(?=\s|$)", "--defense <defense>", command)
    return command.replace(f"{attack}-{defense}", "<attack>-<defense>")


def provenance(results: Sequence[dict]) -> list[str]:
    """Commands, machines, versions and wall time of a set of results, as Markdown lines."""
    if not results:
        return []
    commands = sorted({command_template(m) for m in results} - {""})
    devices = sorted({m.get("device", "?") for m in results})
    versions = sorted({", ".join(f"{k} {v}" for k, v in m.get("environment", {}).items()
                                 if k in ("unpoison", "torch", "torchvision", "python")) for m in results})
    total = sum(m.get("wall_seconds") or 0 for m in results)
    notes = sorted({m.get("profile_note", "") for m in results} - {""})
    lines = ["- command: " + "; ".join(f"`{c}`" for c in commands) if commands else "- command: (not recorded)",
             "- machine: " + "; ".join(devices), "- versions: " + "; ".join(versions),
             f"- wall time: {tables.duration(total)}, the sum over {len(results)} cells (a cell that reused "
             "a cached model did not pay for training it again)"]
    lines += [f"- {note}" for note in notes]
    return ["\n".join(lines) + "\n"]


def split_by_setting(summary: Sequence[dict]) -> dict[tuple, list[dict]]:
    parts: dict[tuple, list[dict]] = {}
    for s in summary:
        parts.setdefault((s["dataset"], s["model"], s["profile"]), []).append(s)
    return parts


def _csv(value: Any) -> Any:
    return "" if value is None else value
