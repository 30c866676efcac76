"""What a user sees of the suspicion scores: the ranking, suspects.csv, where the flagged
images concentrate, and the pictures (the most suspicious images, the score histogram)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..console import UserError
from ..data.imageset import ImageSet
from ..io import atomic_write_bytes, write_csv
from . import figures

SUSPECTS_HEADER = ["path", "label", "score", "flagged"]


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices from most to least suspicious; NaN counts as most suspicious (a sample a
    detector cannot score is not one to trust), ties keep the folder order."""
    s = torch.nan_to_num(scores.double().cpu(), nan=float("inf"))
    return torch.from_numpy(np.argsort(-s.numpy(), kind="stable"))


def flag_top(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    if not 0 < fraction <= 1:
        raise UserError(f"--flag-fraction must lie in (0, 1], got {fraction}")
    flagged = torch.zeros(len(scores), dtype=torch.bool)
    flagged[ranking(scores)[: int(round(fraction * len(scores)))]] = True
    return flagged


def write_suspects(path: Path, data: ImageSet, scores: torch.Tensor | None, flagged: torch.Tensor | None) -> None:
    """suspects.csv: path,label,score,flagged, most suspicious first. Without scores
    (a defence that ranks nothing) the rows keep the folder order and score is empty."""
    order = ranking(scores) if scores is not None else torch.arange(len(data))
    names = data.paths or [f"#{i}" for i in range(len(data))]
    rows = []
    for i in order.tolist():
        score = "" if scores is None else f"{float(scores[i]):.6g}"
        mark = "" if flagged is None else int(bool(flagged[i]))
        rows.append((names[i], data.classes[int(data.labels[i])], score, mark))
    write_csv(path, SUSPECTS_HEADER, rows)


def flag_summary(data: ImageSet, flagged: torch.Tensor) -> dict[str, Any]:
    """How many were flagged and where they concentrate. A dirty-label backdoor relabels
    its images to one target class, so that class holds far more than its share."""
    flagged = flagged.bool().cpu()
    n_flagged = int(flagged.sum())
    per_class = torch.bincount(data.labels[flagged], minlength=data.num_classes).tolist()
    sizes = data.class_counts().tolist()
    classes = sorted(({"class": c, "flagged": f, "size": s, "share_of_flagged": f / max(n_flagged, 1),
                       "fraction_of_class": f / max(s, 1)} for c, f, s in zip(data.classes, per_class, sizes)),
                     key=lambda r: -r["flagged"])
    top = classes[0] if classes else None
    # "concentrated": the top class holds over a third of the flags and at least twice
    # its share of the data (a big class collects more flags without being a target)
    concentrated = bool(top and n_flagged and top["share_of_flagged"] >= 0.35
                        and top["share_of_flagged"] >= 2 * top["size"] / max(len(data), 1))
    return {"n": len(data), "n_flagged": n_flagged, "fraction_flagged": n_flagged / max(len(data), 1),
            "classes": classes, "concentrated_in": top["class"] if concentrated else None}


def summary_lines(summary: dict[str, Any], limit: int = 5) -> list[str]:
    lines = [f"flagged {summary['n_flagged']} of {summary['n']} images ({summary['fraction_flagged']:.1%})"]
    shown = [c for c in summary["classes"] if c["flagged"]][:limit]
    if shown:
        lines.append("by class: " + "; ".join(
            f"{c['class']} {c['flagged']} ({c['share_of_flagged']:.0%} of flagged, {c['fraction_of_class']:.0%} "
            f"of the class)" for c in shown))
    if summary["concentrated_in"] is not None:
        lines.append(f"the flagged images concentrate in class {summary['concentrated_in']!r}: this is what a "
                     "backdoor's target class looks like; inspect suspects.csv, suspects.png and "
                     "suspects_in_class.png (that class's most suspicious images)")
    elif summary["n_flagged"]:
        lines.append("the flagged images are spread over the classes: no single target class stands out")
    return lines


def suspect_order(scores: torch.Tensor, labels: torch.Tensor, count: int, label: int | None = None) -> list[int]:
    """Indices of the `count` most suspicious images (of those given `label`, if set)."""
    order = ranking(scores)
    if label is not None:
        order = order[labels[order] == label]
    return order[:count].tolist()


def save_suspect_grid(path: Path, data: ImageSet, scores: torch.Tensor, flagged: torch.Tensor | None,
                      count: int = 64, columns: int = 8, only_label: int | None = None) -> None:
    """A PNG of the `count` most suspicious images, each titled with rank, label, score;
    with `only_label`, of the most suspicious images given that label only."""
    order = suspect_order(scores, data.labels, count, only_label)
    images = [data.images[i].permute(1, 2, 0).numpy() for i in order]
    titles = [f"{rank}{'*' if flagged is not None and bool(flagged[i]) else ''} "
              f"{_short(data.classes[int(data.labels[i])], 16)}\n{float(scores[i]):.3g}"
              for rank, i in enumerate(order, start=1)]
    within = "" if only_label is None else f" among the images labelled {_short(data.classes[only_label], 24)!r}"
    heading = f"most suspicious first{within} (* = flagged); label and score"
    atomic_write_bytes(path, figures.image_grid_figure(images, titles, heading, columns))


def save_score_histogram(path: Path, scores: torch.Tensor, flagged: torch.Tensor | None) -> None:
    mask = flagged.bool().numpy() if flagged is not None else None
    atomic_write_bytes(path, figures.flagged_histogram_figure(scores.double().numpy(), mask))


def defense_suspects(data: ImageSet, suspicion: torch.Tensor | None, flagged: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any] | None]:
    """A defence's suspicion scores and flags (on the CPU) and the flag summary; each None where
    the defence ranks or flags nothing, so `train` and `repair` report whichever it gives."""
    scores = suspicion.detach().float().cpu() if suspicion is not None else None
    flagged = flagged.bool().cpu() if flagged is not None else None
    summary = flag_summary(data, flagged) if flagged is not None else None
    return scores, flagged, summary


def write_suspect_files(out: Path, data: ImageSet, scores: torch.Tensor | None, flagged: torch.Tensor | None) -> None:
    """OUT/suspects.csv, and where the scores rank the images, OUT/suspects.png and OUT/scores.png."""
    write_suspects(out / "suspects.csv", data, scores, flagged)
    if scores is not None:
        save_suspect_grid(out / "suspects.png", data, scores, flagged)
        save_score_histogram(out / "scores.png", scores, flagged)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
