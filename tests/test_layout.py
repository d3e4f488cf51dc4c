"""What may import what (README: Layout), checked on every module's imports: the contract
(lorastack.adapters) imports none of the others; train and serve import the contract and never
each other; the page talks to the gateway through lorastack.client only; the client imports nothing of ours
but its own answer types (lorastack.client_answers), which import nothing of ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("adapters", "train", "serve", "demo", "client", "client_answers", "cli", "commands")
# folder (or module) -> the lorastack parts it may import
ALLOWED = {"adapters": {"adapters"}, "train": {"adapters", "train"},
           "serve": {"adapters", "serve"}, "demo": {"demo", "client"},
           "lorastack/client.py": {"client_answers"}, "lorastack/client_answers.py": set(),
           "bench": {"adapters", "train", "serve", "client"}}


def _parts_imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
        for name in names:
            bits = name.split(".")
            if bits[0] == "lorastack" and len(bits) > 1 and bits[1] in PARTS:
                found.add(bits[1])
    return found


@pytest.mark.parametrize("where", sorted(ALLOWED))
def test_imports_follow_the_layout(where):
    files = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
    assert files
    wrong = {f"{f.relative_to(ROOT)} imports lorastack.{part}"
             for f in files for part in _parts_imported(f) - ALLOWED[where]}
    assert not wrong, sorted(wrong)
