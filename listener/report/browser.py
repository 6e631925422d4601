"""Headless Chromium, for the report's screenshot and its tests.

Each run gets a fresh profile folder and every background service turned off,
so a run neither reads nor leaves state and makes no network request of its own.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--mute-audio", "--no-default-browser-check")


class BrowserMissing(RuntimeError):
    """No chromium on PATH."""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise BrowserMissing("chromium is not installed: apt-get install -y chromium")


def _run(page: Path, extra: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="listener-chromium-") as profile:
        command = [chromium(), *FLAGS, f"--user-data-dir={profile}", *extra,
                   page.resolve().as_uri()]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=True, cwd=profile)


def dump_dom(page: Path, timeout: float = 60.0) -> str:
    """The page's DOM after loading, serialised by the browser."""
    return _run(page, ["--dump-dom"], timeout).stdout


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2000,
               timeout: float = 60.0) -> Path:
    """A PNG of the page at the given window size."""
    png.parent.mkdir(parents=True, exist_ok=True)
    _run(page, [f"--screenshot={png.resolve()}", f"--window-size={width},{height}"], timeout)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png
