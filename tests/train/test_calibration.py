"""Temperature scaling and the label bias: fitted on validation, stored in the manifest,
applied everywhere."""

from __future__ import annotations

import math
import random

import pytest

from lorastack.adapters import labels as label_scoring
from lorastack.train.calibration import (
    bias_map,
    expected_calibration_error,
    fit_label_bias,
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


def test_a_label_bias_shifts_the_scores_before_the_temperature():
    sums = {"a": -1.0, "b": -2.0, "c": -4.0}
    shifted = label_scoring.probabilities(sums, 2.0, {"c": 3.5})  # b has none: 0
    assert shifted == pytest.approx(label_scoring.probabilities(
        {"a": -1.0, "b": -2.0, "c": -0.5}, 2.0))
    assert label_scoring.predict(shifted) == "c"
    assert label_scoring.probabilities(sums, 1.0, {}) == label_scoring.probabilities(sums)


def test_label_bias_finds_the_rare_class_the_scores_under_rate():
    """Class 2 is 10% of the rows, and its score runs 3 below where it should: argmax hardly ever
    predicts it. The fitted bias gives it back, holds label 0 at 0, and lifts macro-F1."""
    rng = random.Random(3)
    sums, truth = [], []
    for i in range(300):
        y = 2 if i % 10 == 0 else i % 2
        row = [rng.gauss(0, 1) for _ in LABELS]
        row[y] += 2.0
        row[2] -= 3.0
        sums.append(row)
        truth.append(y)
    bias = fit_label_bias(sums, truth)
    assert bias[0] == 0.0 and bias[2] > 1.0

    def macro_f1(b):
        from sklearn.metrics import f1_score

        preds = [max(range(3), key=lambda k: row[k] + b[k]) for row in sums]
        return f1_score(truth, preds, average="macro")

    assert sum(max(range(3), key=lambda k: r[k]) == 2 for r in sums) < 5  # found at 0 bias
    assert macro_f1(bias) > macro_f1([0, 0, 0]) + 0.1
    assert bias_map(LABELS, bias) == {lab: round(b, 6) for lab, b in zip(LABELS, bias) if b}
    # scores that already separate the classes: no shift is the best, and it is kept
    clean = [[3.0 if k == y else 0.0 for k in range(3)] for y in truth]
    assert fit_label_bias(clean, truth) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="one row of label scores per true label"):
        fit_label_bias(sums, truth[:-1])


@pytest.mark.slow
def test_training_calibrates_and_every_evaluation_applies_it(tiny_config, tmp_path):
    from lorastack.adapters.store import AdapterStore
    from lorastack.train import train
    from lorastack.train.assess import adapter_probabilities, calibrate_adapter, evaluate_adapter

    result = train(dict(tiny_config, task={**tiny_config["task"], "label_bias": "macro_f1"}))
    manifest = AdapterStore(tmp_path / "store").resolve("tiny-sentiment").manifest
    val, test = manifest.metrics.validation, manifest.metrics.test
    assert manifest.temperature == val["temperature"] and abs(manifest.temperature - 1) > 1e-3
    # the bias was fitted for validation macro-F1, before the temperature
    assert manifest.label_bias and set(manifest.label_bias) <= set(manifest.labels[1:])
    assert val["macro_f1"] > val["macro_f1_unbiased"]
    assert "accuracy_unbiased" in test
    assert val["nll"] <= val["nll_uncalibrated"] + 1e-9  # what the fit minimises
    assert {"ece", "ece_uncalibrated"} <= set(test)
    assert (result.run_dir / "reliability.png").stat().st_size > 0
    # `lorastack eval` applies the stored temperature: the same test metrics as the trainer's
    again = evaluate_adapter("tiny-sentiment", store=tmp_path / "store")
    assert again["ece"] == pytest.approx(test["ece"], abs=1e-9)
    assert again["nll"] == pytest.approx(test["nll"], abs=1e-6)
    assert again["macro_f1"] == pytest.approx(test["macro_f1"], abs=1e-9)
    probs = adapter_probabilities(result.adapter_dir, ["works great", "made me sick"])
    assert all(sum(p.values()) == pytest.approx(1.0) for p in probs)
    # calibrating the stored adapter again fits the same bias and temperature on the same
    # validation
    out = calibrate_adapter("tiny-sentiment", store=tmp_path / "store",
                            runs_dir=tmp_path / "runs")
    assert out["temperature"] == pytest.approx(manifest.temperature, rel=1e-3)
    assert out["label_bias"] == pytest.approx(manifest.label_bias, abs=1e-5)
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
