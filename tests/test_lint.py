"""Lint and types, as part of the suite: ruff over the repository (its rules in
pyproject.toml), mypy over lorastack.adapters and lorastack.serve (the contract and the
gateway). mypy cannot follow setuptools' package-dir mapping, so it reads the code through a
tree of links laid out as the import names (lorastack/adapters -> adapters/, ...)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FOLDERS = {"adapters": "adapters", "train": "train", "serve": "serve", "demo": "demo"}


def _run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900,
                          check=False)


def test_ruff_finds_nothing():
    done = _run(str(BIN / "ruff"), "check", ".")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_mypy_finds_no_type_error_in_adapters_and_serve(tmp_path):
    package = tmp_path / "lorastack"
    package.mkdir()
    for module in (ROOT / "lorastack").glob("*.py"):
        (package / module.name).symlink_to(module)
    for name, folder in FOLDERS.items():
        (package / name).symlink_to(ROOT / folder, target_is_directory=True)
    done = _run(str(BIN / "mypy"), "--config-file", str(ROOT / "pyproject.toml"),
                "--cache-dir", str(tmp_path / "cache"), "-p", "lorastack.adapters",
                "-p", "lorastack.serve", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Success: no issues found" in done.stdout
