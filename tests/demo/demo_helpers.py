"""Helpers of the page's tests, in a module of their own: test modules import them by this
unique name (a bare `conftest` import resolves to whichever conftest.py was imported first)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output" / "demo"  # screenshots and downloads; ignored by git
FIGURES = REPO / "docs" / "figures"  # tracked: the README's pictures
UPDATE_FIGURES = "LORASTACK_UPDATE_FIGURES"


def save_figure(screenshot: Path, name: str, figures: Path = FIGURES) -> Path | None:
    """The README's picture is the test's screenshot, copied to docs/figures only when asked
    (LORASTACK_UPDATE_FIGURES=1), so that a test run leaves the tracked files alone:
    `LORASTACK_UPDATE_FIGURES=1 .venv/bin/pytest tests/demo/test_page_browser.py`."""
    if os.environ.get(UPDATE_FIGURES, "") not in ("1", "true", "yes"):
        return None
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, figures / name)
    return figures / name
