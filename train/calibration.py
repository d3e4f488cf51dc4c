"""Temperature scaling: label probabilities a user can read as probabilities.

A fine-tuned classifier's softmax is usually over-confident. Temperature scaling (Guo et al.,
"On Calibration of Modern Neural Networks", 2017) divides the labels' summed log-probabilities
by one number T, fitted on validation to minimise the negative log-likelihood of the true
labels; the ranking of labels, so every accuracy and F1, is unchanged. T goes into the
adapter's manifest and adapters/labels.py applies it wherever probabilities are made: the
trainer's evaluation, /v1/classify and the benchmarks' naive server.

Calibration is measured by the expected calibration error (top-label ECE, 10 equal-width
confidence bins: the mean |accuracy - confidence| weighted by each bin's share) and drawn as a
reliability diagram.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from lorastack.adapters import labels as label_scoring

T_BOUNDS = (0.05, 20.0)  # the fitted temperature stays within these
BINS = 10


def fit_temperature(sums: Sequence[Sequence[float]], truth: Sequence[int]) -> float:
    """The T > 0 that minimises the mean NLL of `truth` under softmax(sums / T)."""
    import numpy as np
    from scipy.optimize import minimize_scalar

    if not sums or len(sums) != len(truth):
        raise ValueError("temperature scaling needs one row of label scores per true label")
    s, y = np.asarray(sums, dtype=np.float64), np.asarray(truth)

    def nll(log_t: float) -> float:
        z = s / math.exp(log_t)
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    lo, hi = (math.log(b) for b in T_BOUNDS)
    found = minimize_scalar(nll, bounds=(lo, hi), method="bounded",
                            options={"xatol": 1e-4})
    return float(math.exp(found.x))


def calibrated(sums: Sequence[Sequence[float]], labels: Sequence[str],
               temperature: float) -> list[dict[str, float]]:
    """Each row's label probabilities at `temperature` (the serving path's function)."""
    return [label_scoring.probabilities(dict(zip(labels, row)), temperature) for row in sums]


def reliability_bins(probs: Sequence[Mapping[str, float]], truth: Sequence[str],
                     bins: int = BINS) -> list[dict[str, float]]:
    """Per confidence bin: how many predictions, their mean confidence, their accuracy."""
    out = [{"count": 0, "confidence": 0.0, "accuracy": 0.0} for _ in range(bins)]
    for p, t in zip(probs, truth, strict=True):
        label = label_scoring.predict(p)
        conf = p[label]
        b = out[min(int(conf * bins), bins - 1)]
        b["count"] += 1
        b["confidence"] += conf
        b["accuracy"] += float(label == t)
    for b in out:
        if b["count"]:
            b["confidence"] /= b["count"]
            b["accuracy"] /= b["count"]
    return out


def expected_calibration_error(probs: Sequence[Mapping[str, float]], truth: Sequence[str],
                               bins: int = BINS) -> float:
    """Top-label ECE: sum over bins of share x |accuracy - mean confidence|."""
    n = len(probs)
    if not n:
        return 0.0
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"])
               for b in reliability_bins(probs, truth, bins))


def plot_reliability(path: Path, curves: Mapping[str, tuple[list, list]], title: str) -> None:
    """A reliability diagram: one line per (name -> (probs, truth)), the diagonal is perfect."""
    from lorastack.train.report import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(5.2, 4.6))
    ax.plot([0, 1], [0, 1], color="#999", linestyle=":", label="perfectly calibrated")
    for name, (probs, truth) in curves.items():
        pts = [b for b in reliability_bins(probs, truth) if b["count"]]
        ece = expected_calibration_error(probs, truth)
        ax.plot([b["confidence"] for b in pts], [b["accuracy"] for b in pts], marker="o",
                label=f"{name} (ECE {ece:.3f})")
    ax.set_xlabel("confidence of the predicted label")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    save_figure(fig, path)


def metrics_at(fmt, examples: list, sums, temperature: float) -> tuple[dict, list, list]:
    """Classification metrics at `temperature`, with the uncalibrated ECE and NLL beside them
    (ece_uncalibrated, nll_uncalibrated); and the probabilities at `temperature` and as
    scored."""
    from lorastack.train import evaluate as ev

    raw, raw_probs = ev.classification_from_scores(fmt, examples, sums, 1.0)
    out, probs = ev.classification_from_scores(fmt, examples, sums, temperature)
    out.update(temperature=temperature, ece_uncalibrated=raw["ece"],
               nll_uncalibrated=raw["nll"])
    return out, probs, raw_probs


def calibrated_metrics(model, fmt, validation: list, test: list, *, fit: bool = True,
                       plot: Path | None = None, title: str = "") -> tuple[dict, float]:
    """{"validation": ..., "test": ...} metrics of a classification model at the temperature
    fitted on `validation` (1 when not `fit`), each with its uncalibrated ECE and NLL beside
    (ece_uncalibrated, nll_uncalibrated); a reliability diagram at `plot`."""
    from lorastack.train import evaluate as ev

    metrics, curves = {}, {}
    val_sums = ev.label_logprob_sums(model, fmt, validation, progress=True)
    temperature = fit_temperature(val_sums, [ex.label for ex in validation]) if fit else 1.0
    for split, examples in (("validation", validation), ("test", test)):
        if not examples:
            continue
        sums = val_sums if split == "validation" else \
            ev.label_logprob_sums(model, fmt, examples, progress=True)
        truth = [fmt.labels[ex.label] for ex in examples]
        metrics[split], probs, raw_probs = metrics_at(fmt, examples, sums, temperature)
        curves[f"{split}, as scored"] = (raw_probs, truth)
        if temperature != 1.0:
            curves[f"{split}, T={temperature:.2f}"] = (probs, truth)
    if plot is not None:
        plot_reliability(plot, curves, f"{title}: reliability (10 confidence bins)")
    return metrics, temperature
