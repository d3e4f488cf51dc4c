"""Temperature scaling: fitted on validation, stored in the manifest, applied everywhere."""

from __future__ import annotations

import math
import random

import pytest

from lorastack.adapters import labels as label_scoring
from lorastack.train.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)

LABELS = ["a", "b", "c"]


def _draw(n: int, true_t: float, seed: int = 0):
    """Scores, and labels drawn from softmax(scores / true_t): calibrated at true_t."""
    rng = random.Random(seed)
    sums, truth = [], []
    for _ in range(n):
        row = [rng.gauss(0, 4) for _ in LABELS]
        p = label_scoring.probabilities(dict(zip(LABELS, row)), true_t)
        truth.append(rng.choices(range(3), weights=[p[x] for x in LABELS])[0])
        sums.append(row)
    return sums, truth


def test_fit_recovers_the_temperature_the_labels_were_drawn_at():
    sums, truth = _draw(4000, 2.5)
    assert fit_temperature(sums, truth) == pytest.approx(2.5, rel=0.1)
    sums, truth = _draw(4000, 0.6, seed=1)
    assert fit_temperature(sums, truth) == pytest.approx(0.6, rel=0.1)


def test_ece_falls_once_calibrated():
    sums, truth = _draw(3000, 2.5)
    names = [LABELS[t] for t in truth]
    raw = [label_scoring.probabilities(dict(zip(LABELS, r))) for r in sums]
    t = fit_temperature(sums, truth)
    fixed = [label_scoring.probabilities(dict(zip(LABELS, r)), t) for r in sums]
    before, after = expected_calibration_error(raw, names), expected_calibration_error(fixed,
                                                                                      names)
    assert before > 0.1 and after < 0.03
    bins = reliability_bins(fixed, names)
    assert sum(b["count"] for b in bins) == 3000 and len(bins) == 10


def test_probabilities_at_a_temperature_keep_the_ranking():
    sums = {"a": -1.0, "b": -2.0, "c": -4.0}
    hot = label_scoring.probabilities(sums, 2.0)
    z = sum(math.exp(v / 2) for v in sums.values())
    assert hot["a"] == pytest.approx(math.exp(-0.5) / z)
    assert label_scoring.predict(hot) == label_scoring.predict(label_scoring.probabilities(sums))
    assert hot["a"] < label_scoring.probabilities(sums)["a"]
    with pytest.raises(ValueError, match="temperature must be positive"):
        label_scoring.probabilities(sums, 0.0)


@pytest.mark.slow
def test_training_calibrates_and_every_evaluation_applies_it(tiny_config, tmp_path):
    from lorastack.adapters.store import AdapterStore
    from lorastack.train import train
    from lorastack.train.assess import adapter_probabilities, calibrate_adapter, evaluate_adapter

    result = train(tiny_config)
    manifest = AdapterStore(tmp_path / "store").resolve("tiny-sentiment").manifest
    val, test = manifest.metrics.validation, manifest.metrics.test
    assert manifest.temperature == val["temperature"] and abs(manifest.temperature - 1) > 1e-3
    assert val["nll"] <= val["nll_uncalibrated"] + 1e-9  # what the fit minimises
    assert {"ece", "ece_uncalibrated"} <= set(test)
    assert (result.run_dir / "reliability.png").stat().st_size > 0
    # `lorastack eval` applies the stored temperature: the same test metrics as the trainer's
    again = evaluate_adapter("tiny-sentiment", store=tmp_path / "store")
    assert again["ece"] == pytest.approx(test["ece"], abs=1e-9)
    assert again["nll"] == pytest.approx(test["nll"], abs=1e-6)
    probs = adapter_probabilities(result.adapter_dir, ["works great", "made me sick"])
    assert all(sum(p.values()) == pytest.approx(1.0) for p in probs)
    # calibrating the stored adapter again fits the same temperature on the same validation
    out = calibrate_adapter("tiny-sentiment", store=tmp_path / "store",
                            runs_dir=tmp_path / "runs")
    assert out["temperature"] == pytest.approx(manifest.temperature, rel=1e-3)
    assert AdapterStore(tmp_path / "store").resolve("tiny-sentiment").manifest.temperature \
        == pytest.approx(out["temperature"])


@pytest.mark.slow
def test_calibrate_false_leaves_the_scores_as_they_are(tiny_config, tmp_path):
    from lorastack.adapters.store import AdapterStore
    from lorastack.train import train

    cfg = dict(tiny_config, task={**tiny_config["task"], "calibrate": False})
    cfg["training"] = {**cfg["training"], "max_steps": 2}
    train(cfg)
    manifest = AdapterStore(tmp_path / "store").resolve("tiny-sentiment").manifest
    assert manifest.temperature == 1.0
    assert manifest.metrics.test["ece"] == manifest.metrics.test["ece_uncalibrated"]


def test_overfitting_watch_warns_when_the_gap_widens_as_validation_stalls():
    from lorastack.train.loop import overfitting_note

    def row(step, val, train):
        return {"step": step, "macro_f1": val, "train_sample": {"macro_f1": train}}

    widening = [row(1, 0.60, 0.62), row(2, 0.59, 0.70), row(3, 0.58, 0.80)]
    assert "0.020 -> 0.220" in overfitting_note(widening, "macro_f1", 2)
    assert overfitting_note(widening, "macro_f1", 1) is None  # validation still improving
    steady = [row(1, 0.60, 0.62), row(2, 0.61, 0.60), row(3, 0.58, 0.80)]
    assert overfitting_note(steady, "macro_f1", 2) is None
    loss = [{"step": i, "loss": v, "train_sample": {"loss": t}}
            for i, (v, t) in enumerate([(0.5, 0.45), (0.55, 0.35), (0.6, 0.2)])]
    assert "loss" in overfitting_note(loss, "loss", 2)  # lower is better: the sign flips
