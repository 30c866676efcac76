"""Numbers to text: percentages, mean +- std over seeds, Markdown tables."""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values (std is None below two)."""
    kept = [float(v) for v in values if finite(v)]
    if not kept:
        return None, None
    return statistics.fmean(kept), (statistics.stdev(kept) if len(kept) > 1 else None)


def pct(value: Any, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}" if finite(value) else "\u2014"


def pct_pm(mean: Any, std: Any = None, digits: int = 2) -> str:
    """'91.20' or '91.20 \u00b1 0.35' (percent), '\u2014' when there is no value."""
    if not finite(mean):
        return "\u2014"
    return pct(mean, digits) + (f" \u00b1 {100 * std:.{digits}f}" if finite(std) else "")


def num_pm(mean: Any, std: Any = None, digits: int = 3) -> str:
    if not finite(mean):
        return "\u2014"
    return f"{mean:.{digits}f}" + (f" \u00b1 {std:.{digits}f}" if finite(std) else "")


def duration(seconds: Any) -> str:
    if not finite(seconds):
        return "\u2014"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
