"""Render an experiment's HTML report in headless Chromium and save a screenshot.

Usage (Debian: ``apt-get install chromium chromium-driver``)::

    python docs/screenshot_report.py demo-run/report/report.html docs/report_screenshot.png

Chromium runs with no network access needed: the report embeds all its images.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    """The Chromium executable, if one is installed."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    html: str | Path, png: str | Path, width: int = 1280, height: int = 2400, timeout: int = 120
) -> Path:
    """Render ``html`` at ``width`` x ``height`` CSS pixels into ``png``."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("Chromium is not installed (Debian: apt-get install chromium)")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                Path(html).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot to {png}")
    return png


def main(argv: list[str] | None = None) -> int:
    """Command line: HTML in, PNG out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html")
    parser.add_argument("png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    print(screenshot(args.html, args.png, args.width, args.height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
