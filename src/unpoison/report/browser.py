"""Render a report in headless Chromium: a screenshot, and the page's own image self-check.

Used by benchmarks/screenshot_report.py and tests/test_report.py so that a page that
does not render (a broken figure, bad HTML) is caught before anyone ships it.
Debian: `apt-get install chromium`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("UNPOISON_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _command(browser: str, profile_dir: str, *extra: str) -> list[str]:
    # an empty throw-away profile, nothing that phones home; --no-sandbox because CI runs as root
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", "--run-all-compositor-stages-before-draw", "--virtual-time-budget=5000",
            f"--user-data-dir={profile_dir}", *extra]


def screenshot(page: str | os.PathLike, png: str | os.PathLike, width: int = 1100, height: int = 3200,
               browser: str | None = None, timeout: float = 120) -> Path:
    """Write a PNG screenshot of `page` (an HTML file) at width x height pixels."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium; or set UNPOISON_CHROMIUM)")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="unpoison-chromium-") as profile:
        cmd = _command(browser, profile, f"--window-size={width},{height}", f"--screenshot={png}",
                       Path(page).resolve().as_uri())
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png


def images_loaded(page: str | os.PathLike, browser: str | None = None, timeout: float = 120) -> tuple[int, int]:
    """(decoded, total) images of the page after load, as its self-check script counted them."""
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium found (Debian: apt-get install chromium; or set UNPOISON_CHROMIUM)")
    with tempfile.TemporaryDirectory(prefix="unpoison-chromium-") as profile:
        cmd = _command(browser, profile, "--dump-dom", Path(page).resolve().as_uri())
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', done.stdout)
    if match is None:
        raise RuntimeError(f"the page's self-check did not run (exit {done.returncode}): {done.stderr[-2000:]}")
    return int(match[1]), int(match[2])
