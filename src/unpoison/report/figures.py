"""Figures of a run, of a user command's suspects and of a benchmark grid, drawn with matplotlib's Agg canvas to PNG bytes.

No pyplot: each function builds its own `Figure`, so nothing here touches global
matplotlib state or needs a display.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any, Iterable

import numpy as np

DPI = 100
METRIC_STYLE = {  # name in metrics.json -> (label, colour)
    "clean_acc": ("CA (clean test)", "tab:blue"),
    "asr": ("ASR (triggered test)", "tab:red"),
    "robust_acc": ("RA (triggered, true label)", "tab:green"),
    "train_acc_clean": ("clean training samples", "tab:blue"),
    "train_acc_poison": ("poisoned training samples", "tab:red"),
}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def to_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ---------------------------------------------------------------------------- trigger
def _hwc(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(image, (1, 2, 0)))


def trigger_figure(examples: dict[str, np.ndarray], n: int = 2) -> bytes:
    """Clean vs poisoned training images and clean vs triggered test images, with the
    absolute difference amplified so that faint triggers (blends, warps) become visible."""
    classes = [str(c) for c in examples["classes"]]
    blocks = [("training", examples["train_clean"], examples["train_poisoned"],
               [f"{classes[a]} \u2192 {classes[b]}" for a, b in zip(examples["train_label"], examples["train_given_label"])]),
              ("test", examples["test_clean"], examples["test_triggered"],
               [f"true {classes[a]}, target {classes[b]}" for a, b in zip(examples["test_label"], examples["test_target"])])]
    rows = min(n, len(examples["train_clean"]), len(examples["test_clean"]))
    fig = _figure(9.6, 1.75 * rows + 0.4)
    axes = fig.subplots(rows, 6, squeeze=False)
    for b, (name, clean, poisoned, captions) in enumerate(blocks):
        diff = np.abs(poisoned[:rows].astype(np.int16) - clean[:rows].astype(np.int16))
        gain = 255.0 / diff.max() if diff.max() > 0 else 1.0
        titles = [f"{name}: clean", f"{name}: poisoned" if name == "training" else "test: triggered",
                  f"|difference| \u00d7{gain:.0f}" if diff.max() > 0 else "identical"]
        for r in range(rows):
            shown = [clean[r], poisoned[r], np.clip(diff[r] * gain, 0, 255).astype(np.uint8)]
            for c, image in enumerate(shown):
                ax = axes[r, 3 * b + c]
                ax.imshow(_hwc(image), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if r == 0:
                    ax.set_title(titles[c], fontsize=8)
                if c == 1:
                    ax.set_xlabel(captions[r], fontsize=7)
    return to_png(fig)


# ---------------------------------------------------------------------------- curves
def _stage_offsets(records: Iterable[dict]) -> tuple[dict[str, int], list[tuple[str, int, int]]]:
    """Lay stages end to end on one epoch axis: stage -> offset, and (stage, start, end) spans."""
    last: dict[str, int] = {}
    for record in records:
        last[record["stage"]] = max(last.get(record["stage"], 0), int(record["epoch"]))
    offsets, spans, position = {}, [], 0
    for stage, epochs in last.items():
        offsets[stage] = position
        spans.append((stage, position, position + epochs))
        position += epochs
    return offsets, spans


def _plot_by_stage(ax, records: list[dict], keys: Iterable[str], scale: float = 1.0) -> bool:
    offsets, spans = _stage_offsets(records)
    drawn = False
    for key in keys:
        label, colour = METRIC_STYLE.get(key, (key, None))
        for stage, _, _ in spans:  # one line per stage, so no line joins two stages
            points = sorted((offsets[stage] + int(r["epoch"]), r[key] * scale) for r in records
                            if r["stage"] == stage and _finite(r.get(key)))
            if points:
                xs, ys = zip(*points)
                line = ax.plot(xs, ys, marker="o", markersize=3, color=colour, label=label)[0]
                colour, label, drawn = line.get_color(), None, True
    for i, (stage, start, end) in enumerate(spans):
        if i:
            ax.axvline(start + 0.5, color="0.6", linestyle="--", linewidth=0.8)
        ax.text((start + end) / 2 + 0.5, 1.01, stage, transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=8, color="0.3")
    from matplotlib.ticker import MaxNLocator

    if spans:  # the whole span, also when only some epochs were measured (a resumed run)
        ax.set_xlim(0.5, spans[-1][2] + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (stages laid end to end)")
    ax.grid(alpha=0.3)
    return drawn


def _dedupe(records: list[dict]) -> list[dict]:
    """One record per (stage, epoch), the last one written (a resumed run may repeat epochs)."""
    latest = {(r["stage"], int(r["epoch"])): r for r in records if "stage" in r and "epoch" in r}
    return list(latest.values())


def curves_figure(curves: list[dict], log: list[dict] | None = None) -> bytes:
    """CA / ASR / RA after every epoch of every stage (metrics.json 'curves'), and the
    training loss of each stage from the engine's log.jsonl when it is there."""
    curves, log = _dedupe(curves), _dedupe(log or [])
    with_loss = any(_finite(r.get("loss")) for r in log)
    fig = _figure(9.6, 3.4 if not with_loss else 6.2)
    axes = fig.subplots(2 if with_loss else 1, 1, squeeze=False)[:, 0]
    _plot_by_stage(axes[0], curves, ("clean_acc", "asr", "robust_acc"), scale=100)
    axes[0].set_ylabel("% of test images")
    axes[0].set_ylim(-3, 103)
    axes[0].legend(fontsize=8, loc="best")
    if with_loss:
        _plot_by_stage(axes[1], log, ("loss",))
        axes[1].set_ylabel("training loss (stage's own objective)")
    return to_png(fig)


def stage_metrics_figure(stages: list[dict]) -> bytes:
    """CA / ASR / RA measured after each stage: the fallback when no per-epoch curves exist."""
    fig = _figure(7.0, 3.0)
    ax = fig.subplots()
    names = [s["name"] for s in stages]
    for key in ("clean_acc", "asr", "robust_acc"):
        values = [s.get(key) for s in stages]
        if any(_finite(v) for v in values):
            label, colour = METRIC_STYLE[key]
            ax.plot(range(len(names)), [100 * v if _finite(v) else np.nan for v in values], marker="o",
                    label=label, color=colour)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("% of test images")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_png(fig)


def subset_accuracy_figure(curves: list[dict]) -> bytes:
    """Training accuracy on the poisoned vs the clean training samples, per epoch: the
    DLP paper's Figure 1 (poisoned samples are learned much faster than clean ones)."""
    fig = _figure(9.6, 3.4)
    ax = fig.subplots()
    _plot_by_stage(ax, _dedupe(curves), ("train_acc_poison", "train_acc_clean"), scale=100)
    ax.set_ylabel("training accuracy, % (given labels)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8, loc="best")
    return to_png(fig)


# ---------------------------------------------------------------------------- scores
def scores_figure(scores: np.ndarray, is_poison: np.ndarray, auroc: float | None = None) -> bytes:
    """Histogram of the suspicion scores of clean vs poisoned training samples (each group
    normalised to sum to 1, since poisoned samples are a small minority)."""
    scores, is_poison = np.asarray(scores, dtype=np.float64), np.asarray(is_poison, dtype=bool)
    finite = np.isfinite(scores)
    values = scores[finite]
    fig = _figure(7.5, 3.4)
    ax = fig.subplots()
    # scores spanning many orders of magnitude (feature distances) read better on log bins
    positive = values[values > 0]
    log_bins = (len(positive) == len(values) and len(values) > 1
                and np.quantile(positive, 0.99) / max(np.quantile(positive, 0.01), 1e-300) > 1e3)
    if log_bins:
        edges = np.geomspace(positive.min(), positive.max(), 51)
        ax.set_xscale("log")
    else:
        edges = np.histogram_bin_edges(values, bins=50) if len(values) else np.linspace(0, 1, 51)
    for mask, label, colour in ((~is_poison, "clean", "tab:blue"), (is_poison, "poisoned", "tab:red")):
        group = scores[mask & finite]
        if len(group):
            ax.hist(group, bins=edges, weights=np.full(len(group), 1 / len(group)), alpha=0.6, color=colour,
                    label=f"{label} (n={len(group)})")
    ax.set_xlabel("suspicion score (higher = more likely poisoned)")
    ax.set_ylabel("share of the group")
    title = "per-sample scores of the training set"
    if _finite(auroc):
        title += f"; detection AUROC {auroc:.3f}"
    if (~finite).any():
        title += f"; {int((~finite).sum())} non-finite scores not shown"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return to_png(fig)


# ---------------------------------------------------------------------------- suspects (user commands)
def image_grid_figure(images: list[np.ndarray], titles: list[str], heading: str, columns: int = 8) -> bytes:
    """Images (HWC uint8) in rows of `columns`, each under its title. Titles come from the
    data (class names): parse_math=False keeps a folder named "$\\foo" from the mathtext parser."""
    rows = max(1, -(-len(images) // columns))
    fig = _figure(columns * 1.6, rows * 1.85 + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=7, parse_math=False)
    fig.suptitle(heading, fontsize=9, parse_math=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic class names
        return to_png(fig)


def flagged_histogram_figure(scores: np.ndarray, flagged: np.ndarray | None) -> bytes:
    """Histogram of suspicion scores on a log count axis, flagged images in red: a backdoor
    tends to show as a separate mode at the high end; clean data as one smooth hump."""
    values = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    bins = np.histogram_bin_edges(values, bins=60)
    fig = _figure(7, 3)
    ax = fig.subplots()
    if flagged is not None and flagged.any():
        ax.hist(values[~flagged], bins=bins, color="#4a7ebb", label="not flagged")
        ax.hist(values[flagged], bins=bins, color="#c0392b", label="flagged")
        ax.legend()
    else:
        ax.hist(values, bins=bins, color="#4a7ebb")
    ax.set_yscale("log")
    ax.set_xlabel("suspicion score (higher = more suspicious)")
    ax.set_ylabel("images")
    return to_png(fig)


# ---------------------------------------------------------------------------- benchmark grids
def bench_bars_figure(summary: list[dict], title: str = "") -> bytes:
    """Grouped bars: CA and ASR per attack (x), one bar per defence, error bars = std over seeds."""
    attacks = list(dict.fromkeys(r["attack"] for r in summary))
    defenses = list(dict.fromkeys(r["defense"] for r in summary))
    lookup = {(r["attack"], r["defense"]): r for r in summary}
    fig = _figure(max(6.5, 1.1 * len(attacks) + 3), 5.6)
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(len(defenses), 1)
    for ax, key, label in ((axes[0], "clean_acc", "CA, %"), (axes[1], "asr", "ASR, %")):
        for j, defense in enumerate(defenses):
            xs, ys, errs = [], [], []
            for i, attack in enumerate(attacks):
                row = lookup.get((attack, defense))
                if row and _finite(row.get(f"{key}_mean")):
                    xs.append(i + (j - (len(defenses) - 1) / 2) * width)
                    ys.append(100 * row[f"{key}_mean"])
                    errs.append(100 * row[f"{key}_std"] if _finite(row.get(f"{key}_std")) else 0)
            ax.bar(xs, ys, width, yerr=errs, label=defense, capsize=2)
        ax.set_ylabel(label)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(attacks)), attacks)
    axes[1].set_xlabel("attack")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="defence", fontsize=8, loc="outside right upper")
    if title:
        fig.suptitle(title, fontsize=10)
    return to_png(fig)


def bench_tradeoff_figure(summary: list[dict], title: str = "") -> bytes:
    """ASR against CA for every (attack, defence): the lower right is where a defence wants to be."""
    fig = _figure(6.5, 4.8)
    ax = fig.subplots()
    defenses = list(dict.fromkeys(r["defense"] for r in summary))
    attacks = [a for a in dict.fromkeys(r["attack"] for r in summary) if a != "none"]
    markers = "osD^v<>Xph*"
    for j, defense in enumerate(defenses):
        for i, attack in enumerate(attacks):
            for r in summary:
                if r["defense"] == defense and r["attack"] == attack and _finite(r.get("asr_mean")):
                    ax.scatter(100 * r["clean_acc_mean"], 100 * r["asr_mean"], color=f"C{j % 10}",
                               marker=markers[i % len(markers)], s=40)
    for j, defense in enumerate(defenses):
        ax.scatter([], [], color=f"C{j % 10}", marker="o", label=f"defence {defense}")
    for i, attack in enumerate(attacks):
        ax.scatter([], [], color="0.4", marker=markers[i % len(markers)], label=f"attack {attack}")
    ax.set_xlabel("CA, %")
    ax.set_ylabel("ASR, %")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if title:
        ax.set_title(title, fontsize=10)
    return to_png(fig)
