"""Render a run's report.html in headless Chromium: check its figures decode, save a screenshot.

    python benchmarks/screenshot_report.py RUN_DIR [--out report.png] [--width 1100] [--height 3200]

Exits 1 when a figure fails to load. Needs Chromium (Debian: `apt-get install chromium`;
another binary: UNPOISON_CHROMIUM=/path/to/chrome). tests/test_report.py does the same
check on a smoke run whenever Chromium is installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unpoison.report import REPORT_FILE, write_report
from unpoison.report.browser import find_chromium, images_loaded, screenshot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a folder written by `unpoison run` (report.html is made if missing)")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/report.png)")
    parser.add_argument("--width", type=int, default=1100)
    parser.add_argument("--height", type=int, default=3200)
    args = parser.parse_args(argv)

    if find_chromium() is None:
        print("no Chromium found: apt-get install chromium (or set UNPOISON_CHROMIUM)", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    page = run_dir / REPORT_FILE
    if not page.is_file():
        write_report(run_dir)
    loaded, total = images_loaded(page)
    shot = screenshot(page, args.out or run_dir / "report.png", args.width, args.height)
    print(f"{page}: {loaded}/{total} figures decoded; screenshot {shot}", file=sys.stderr)
    return 0 if loaded == total else 1


if __name__ == "__main__":
    sys.exit(main())
