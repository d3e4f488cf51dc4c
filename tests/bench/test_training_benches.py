"""The training-side benchmark scripts run end to end on a tiny setting, and `bench.report`
renders their results into a README. No timing is asserted: only that every script finishes,
writes its JSON (with the machine/version record and the report fields) and its figure, and
that the numbers are numbers. The real figures come from `make bench`, run alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(module: str, out: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, "--tiny", "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory, base_model):
    out = tmp_path_factory.mktemp("bench-results")
    for module in ("bench.training", "bench.memory", "bench.quality", "bench.ceilings"):
        _run(module, out)
    return out


def _load(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["name"] == name and data["setting"] == "tiny"
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    assert "torch" in data["versions"] and "transformers" in data["versions"]
    assert data["title"] and data["summary"]
    for table in data["tables"]:
        assert all(len(row) == len(table["columns"]) for row in table["rows"]), table
    assert (out / data["figure"]).stat().st_size > 5000  # a real PNG, not an empty file
    assert (out / data["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return data


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_training_compares_three_trainers_on_the_same_work(results):
    data = _load(results, "training")
    assert set(data["tokens_per_s"]) == {"lorastack", "hf-tutorial", "trl-sft"}
    for recipe, runs in data["rounds"].items():
        assert runs and all(_positive(r["tokens_per_s"]) and _positive(r["peak_rss_mb"])
                            for r in runs), recipe
    counts = {r: data["accuracy_runs"][r]["examples"] for r in data["accuracy_runs"]}
    assert len(set(counts.values())) == 1, counts
    for recipe, run in data["accuracy_runs"].items():
        steps = [e["step"] for e in run["evals"]]
        assert steps and steps == sorted(set(steps)), recipe  # one evaluation per step, in order
        assert all(0 <= e["accuracy"] <= 1 for e in run["evals"]), recipe
    # the first target is the best accuracy that every trainer reached
    assert data["target_accuracy"] == min(max(e["accuracy"] for e in run["evals"])
                                          for run in data["accuracy_runs"].values())
    assert data["settings"]["trl_settings"]["gradient_checkpointing"] is True  # TRL's default
    # all three trainers ran under the allocator `lorastack train` runs under, as recorded
    assert {r["allocator"] for runs in data["rounds"].values() for r in runs} == {"tcmalloc"}
    assert {r["allocator"] for r in data["accuracy_runs"].values()} == {"tcmalloc"}
    assert data["settings"]["allocator"] == data["machine"]["allocator"] == "tcmalloc"
    (goal,) = data["goals"]
    assert _positive(goal["value"]) and goal["met"] in (True, False)


def test_memory_measures_each_precision(results):
    data = _load(results, "memory")
    med = data["medians"]
    assert set(med) == {"none", "8bit", "4bit", "4bit-fast"}
    for variant, m in med.items():
        assert m["step_peak_mb"] >= m["loaded_mb"] > m["runtime_mb"] > 0, variant
    # the weight footprints are what quantization is for: 4-bit < 8-bit < float32
    assert med["4bit"]["weights_mb"] < med["8bit"]["weights_mb"] < med["none"]["weights_mb"]
    assert all(r["peak_reset"] for runs in data["runs"].values() for r in runs)
    # the workers ran under the allocator `lorastack train` runs under, and the record says so
    assert {r["allocator"] for runs in data["runs"].values() for r in runs} == {"tcmalloc"}
    assert data["settings"]["allocator"] == data["machine"]["allocator"] == "tcmalloc"
    assert _positive(data["goals"][0]["value"])


def test_quality_reports_adapters_and_baselines(results):
    data = _load(results, "quality")
    cls, gen = data["adapters"]["classification"], data["adapters"]["generation"]
    for scored in (cls["test"], cls["zero_shot"]):  # each metric agrees with its confusion
        _agrees_with_confusion(scored)
    for scored in (gen["test"], gen["zero_shot"]):  # an exact match is a token-F1 of 1
        hits = scored["exact_match"] * scored["n"]
        assert scored["n"] > 0 and abs(hits - round(hits)) < 1e-6, scored
        assert scored["exact_match"] <= scored["token_f1"] <= 1, scored
    assert [t["method"].split(" (")[0] for t in data["tfidf"]] == ["tfidf-logreg"] * 2
    # calibration before/after and the goals, each with a measured value
    assert cls["temperature"] > 0 and {"ece", "ece_uncalibrated"} <= set(cls["test"])
    calibration = data["tables"][1]["rows"]
    assert calibration[0][1] == f"{cls['test']['ece_uncalibrated']:.3f}"
    assert [g["goal"].split(" ")[0] for g in data["goals"]] == ["sentiment", "neutral",
                                                                 "expected", "ensemble", "search"]
    # no search here, so no ensemble of its trials: not measured, and it says how to measure it
    assert data["goals"][3]["value"] is None and "tune --ensemble" in data["goals"][3]["note"]
    assert data["goals"][0]["value"] == cls["test"]["macro_f1"]
    assert data["goals"][1]["value"] == cls["test"]["per_class"]["neutral"]["f1"]


def _agrees_with_confusion(scored: dict) -> None:
    """accuracy, macro-F1 and each label's F1 as the confusion matrix (true x predicted) gives
    them, over all n examples."""
    c = scored["confusion"]
    k = len(scored["labels"])
    assert len(c) == k and all(len(row) == k for row in c), c
    total = sum(map(sum, c))
    assert total == scored["n"] > 0, scored
    assert math.isclose(scored["accuracy"], sum(c[i][i] for i in range(k)) / total)
    f1 = [2 * c[i][i] / (sum(c[i]) + sum(row[i] for row in c) or 1) for i in range(k)]
    assert math.isclose(scored["macro_f1"], sum(f1) / k, abs_tol=1e-9), (scored, f1)
    for label, value in zip(scored["labels"], f1):
        assert math.isclose(scored["per_class"][label]["f1"], value, abs_tol=1e-9), label


def test_lora_variants_trains_a_variant_and_reports_it(tmp_path, base_model):
    """One variant (PiSSA, the one with its own export path) on a 1-step run; LoRA+ and
    PiSSA themselves are tested in tests/train/test_trainer.py."""
    _run("bench.lora_variants", tmp_path, "--variants", "pissa")
    data = _load(tmp_path, "lora_variants")
    (run,) = data["runs"]
    assert (run["variant"], run["seed"], run["rank_stored"]) == ("pissa", 0, 32)  # 2 x r=16
    assert run["settings"] == {"lora": {"init": "pissa", "serving_rank": 32}}
    assert run["test"]["n"] == 4 and _positive(run["train_seconds"]) and run["steps"] == 1
    (row,) = data["tables"][0]["rows"]
    assert row[:2] == ["pissa", 0] and row[4] == f"{run['test']['macro_f1']:.3f}"
    assert row[5] == f"{run['test']['neutral_f1']:.3f}" and set(data["means"]) == {"pissa"}


def test_ceilings_measure_the_machine_and_the_fractions(results):
    data = _load(results, "ceilings")
    assert _positive(data["matmul"]["gflops"]["median"])
    assert _positive(data["bandwidth"]["read_gbs"]["median"])
    assert _positive(data["model"]["flops_per_token"])
    # training.json sits in the same directory, so the trainer's fraction is computed
    assert _positive(data["fractions"]["trainer"]["fraction"])


def test_report_regenerates_the_readme_sections(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:performance:start -->\nstale\n"
                      "<!-- bench:performance:end -->\nmiddle\n<!-- bench:quality:start -->\n"
                      "<!-- bench:quality:end -->\n<!-- bench:support:start -->\n"
                      "<!-- bench:support:end -->\nafter\n")
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--out", str(results),
                           "--readme", str(readme)], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "stale" not in text and "before" in text and "middle" in text and "after" in text
    for title in ("## Performance", "### Training throughput", "### Training memory",
                  "### Machine ceilings", "## Quality", "### Quality", "## Model families"):
        assert title in text, title
    assert "Not measured yet: run `.venv/bin/python -m bench.families`" in text  # not run here
    rel = Path(__import__("os").path.relpath(results, tmp_path)).as_posix()
    assert f"]({rel}/training.png)" in text
    assert "tiny setting" in text  # tiny results are never passed off as measurements
    # a second run changes nothing (idempotent)
    subprocess.run([sys.executable, "-m", "bench.report", "--out", str(results), "--readme",
                    str(readme)], cwd=REPO, check=True, capture_output=True)
    assert readme.read_text() == text


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--out", str(tmp_path),
                           "--readme", str(readme)], cwd=REPO, capture_output=True, text=True,
                          check=False)
    assert proc.returncode != 0 and "markers" in proc.stderr
    assert readme.read_text() == "# no markers\n"


def test_lora_ops_times_each_form_against_vllms_fallback(tmp_path):
    _run("bench.lora_ops", tmp_path)
    data = _load(tmp_path, "lora_ops")
    forms = {"vllm", "lorastack", "lorastack, dense", "lorastack, per adapter", "base matmuls"}
    assert {(r["rows"], r["layout"]) for r in data["results"]} == {
        (16, "round robin"), (16, "runs"), (64, "round robin"), (64, "runs")}
    for r in data["results"]:
        assert set(r["seconds"]) == forms and all(map(_positive, r["seconds"].values()))
    assert _positive(data["goals"][0]["value"])


def test_label_eval_times_evaluation_against_training(tmp_path, base_model):
    _run("bench.label_eval", tmp_path)
    data = json.loads((tmp_path / "label_eval.json").read_text())
    assert data["name"] == "label_eval" and data["setting"] == "tiny"
    assert len(data["labels"]) == 4 and max(data["labels"].values()) > 1  # multi-token labels
    assert data["examples"] > 0 and _positive(data["train_seconds"])
    assert set(data["eval_seconds"]) == {"lorastack (KV cache)", "one row per label (before)"}
    assert all(map(_positive, data["eval_seconds"].values()))
    (goal,) = data["goals"]
    assert _positive(goal["value"]) and goal["met"] in (True, False)
