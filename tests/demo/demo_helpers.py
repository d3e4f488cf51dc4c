"""Helpers of the page's tests, in a module of their own: test modules import them by this
unique name (a bare `conftest` import resolves to whichever conftest.py was imported first)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "test-output" / "demo"


def copy_adapter(src, name: str, dst, new_name: str):
    """The same weights under another name (an ensemble member, or a 'new' adapter)."""
    adapter = src.resolve(name)
    return dst.write(new_name, adapter.path, dataclasses.replace(adapter.manifest,
                                                                 name=new_name))


def save_figure(screenshot: Path, name: str) -> None:
    """The README's picture is the test's screenshot."""
    figures = REPO / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, figures / name)
