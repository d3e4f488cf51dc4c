"""bench.memory_plan on its tiny setting: a tiny random Llama, float and 4-bit, each row a real
training process measured and planned. No accuracy is asserted here (the full run's job): only
that every row has a positive prediction and measurement and that the error is computed from
them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_memory_plan_tiny(tmp_path, base_model):
    proc = subprocess.run([sys.executable, "-m", "bench.memory_plan", "--tiny", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "memory_plan.json").read_text())
    assert data["name"] == "memory_plan" and data["setting"] == "tiny"
    assert "torch" in data["versions"] and data["title"] and data["summary"]
    rows = data["rows"]
    assert {(r["quantization"], r["gradient_checkpointing"]) for r in rows} == {
        ("none", False), ("4bit", True)}
    for r in rows:
        assert r["predicted_bytes"] > 0 and r["measured_bytes"] > r["runtime_bytes"] > 0, r
        assert r["predicted_bytes"] == sum(r["rows"].values())
        assert r["error"] == pytest.approx(r["predicted_bytes"] / r["measured_bytes"] - 1)
        # the tiny setting runs each row once: that run is the row's measurement, no spread
        assert r["runs_bytes"] == [r["measured_bytes"]] and r["spread"] == 0
        # by default the workers run under tcmalloc, as `lorastack train` does, and the plan
        # then counts no allocator slack
        assert r["allocator"] == "tcmalloc" and r["rows"]["allocator slack"] == 0
    assert data["settings"]["allocator"] == "tcmalloc" and "tcmalloc" in data["summary"]
    (table,) = data["tables"]
    assert len(table["rows"]) == len(rows)
    assert all(len(row) == len(table["columns"]) for row in table["rows"])
    goal, auto = data["goals"]
    worst = max(abs(r["error"]) for r in rows)
    assert goal["value"] == pytest.approx(worst) and goal["met"] == (worst <= 0.15)
    # batch_size: auto's margin: the worst row's peak as a share of its plan / the margin of
    # the workers' allocator (tcmalloc: 90% of the budget)
    from lorastack.train.autobatch import cpu_margin

    assert cpu_margin("tcmalloc") == 0.9 and "held to 90%" in auto["measured"]
    headroom = max(r["measured_bytes"] * 0.9 / r["predicted_bytes"] for r in rows)
    assert auto["value"] == pytest.approx(headroom) and auto["met"] == (headroom <= 1)
    png = tmp_path / data["figure"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_a_repeated_row_is_held_to_its_worst_run():
    """Every run is a measurement the 15% goal holds the plan to: the row reports the run the
    plan is furthest from, every run's peak and how far they lie apart."""
    from bench.memory_plan import _row

    pred = {"predicted_bytes": 1000, "rows": {"x": 1000}}
    runs = [{"measured_bytes": 950, "runtime_bytes": 1, "allocator": "tcmalloc"},
            {"measured_bytes": 1250, "runtime_bytes": 2, "allocator": "tcmalloc"}]
    row = _row("m", "none", False, 2, 64, True, pred, runs)
    assert row["measured_bytes"] == 1250 and row["runtime_bytes"] == 2
    assert row["error"] == pytest.approx(1000 / 1250 - 1)
    assert row["runs_bytes"] == [950, 1250] and row["spread"] == pytest.approx(1250 / 950 - 1)
