"""Temperature scaling: label probabilities a user can read as probabilities.

A fine-tuned classifier's softmax is usually over-confident. Temperature scaling (Guo et al.,
"On Calibration of Modern Neural Networks", 2017) divides the labels' summed log-probabilities
by one number T, fitted on validation to minimise the negative log-likelihood of the true
labels; the ranking of labels, so every accuracy and F1, is unchanged. T goes into the
adapter's manifest and adapters/labels.py applies it wherever probabilities are made: the
trainer's evaluation, /v1/classify and the benchmarks' naive server.

A label bias (`task.label_bias: macro_f1`) is the decision rule's part: one number per label
added to its score before the temperature, a shift of the labels' prior, fitted on validation
to maximise macro-F1 (coordinate ascent over the exact points where a prediction changes,
label 0 held at 0; a tie keeps the smaller shift). A rare class the model under-predicts is
then found more often; accuracy may fall, and a shift fitted on a small validation split fits
its noise too. It goes into the manifest as `label_bias` and is applied wherever the
temperature is; the temperature is then fitted on the shifted scores.

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


def fit_label_bias(sums: Sequence[Sequence[float]], truth: Sequence[int],
                   rounds: int = 10) -> list[float]:
    """Per-label offsets (label 0's is 0) added to the scores that maximise the macro-F1 of
    their argmax over `truth`: coordinate ascent, each label's offset set to the best of the
    midpoints between the values at which some row's prediction changes (and 0 and its
    current value); a tie keeps the offset nearer 0."""
    import numpy as np

    if not sums or len(sums) != len(truth):
        raise ValueError("a label bias needs one row of label scores per true label")
    s, y = np.asarray(sums, dtype=np.float64), np.asarray(truth)
    k = s.shape[1]
    bias = np.zeros(k)
    best = _macro_f1(s, y, bias)
    for _ in range(rounds):
        moved = False
        for j in range(1, k):
            others = np.delete(s + bias, j, axis=1).max(1)
            edges = np.unique(others - s[:, j])  # row n predicts j once bias_j passes edge n
            candidates = np.concatenate([(edges[:-1] + edges[1:]) / 2, [edges[0] - 1.0,
                                         edges[-1] + 1.0, 0.0, bias[j]]])
            for c in candidates:
                trial = bias.copy()
                trial[j] = c
                f1 = _macro_f1(s, y, trial)
                if f1 > best + 1e-12 or (f1 > best - 1e-12 and abs(c) < abs(bias[j]) - 1e-12):
                    best, bias, moved = max(best, f1), trial, True
        if not moved:
            break
    return [float(b) for b in bias]


def _macro_f1(s, y, bias) -> float:
    import numpy as np

    k = s.shape[1]
    pred = (s + bias).argmax(1)
    confusion = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion)
    denominator = confusion.sum(0) + confusion.sum(1)
    return float(np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0).mean())


def bias_map(labels: Sequence[str], bias: Sequence[float]) -> dict[str, float]:
    """The labels' nonzero offsets, as the manifest stores them ({} when none moved)."""
    return {label: round(float(b), 6) for label, b in zip(labels, bias) if b}


def calibrated(sums: Sequence[Sequence[float]], labels: Sequence[str], temperature: float,
               bias: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """Each row's label probabilities under `bias` and `temperature` (the serving path's
    function)."""
    return [label_scoring.probabilities(dict(zip(labels, row)), temperature, bias)
            for row in sums]


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


def metrics_at(fmt, examples: list, sums, temperature: float,
               bias: Mapping[str, float] | None = None) -> tuple[dict, list, list]:
    """Classification metrics under `bias` and `temperature`, with the uncalibrated ECE and
    NLL beside them (ece_uncalibrated, nll_uncalibrated; and macro_f1_unbiased and
    accuracy_unbiased when there is a bias); and the probabilities as calibrated and as
    scored."""
    from lorastack.train import evaluate as ev

    raw, raw_probs = ev.classification_from_scores(fmt, examples, sums, 1.0)
    out, probs = ev.classification_from_scores(fmt, examples, sums, temperature, bias)
    out.update(temperature=temperature, ece_uncalibrated=raw["ece"],
               nll_uncalibrated=raw["nll"])
    if bias:
        out.update(macro_f1_unbiased=raw["macro_f1"], accuracy_unbiased=raw["accuracy"])
    return out, probs, raw_probs


def calibrated_metrics(model, fmt, validation: list, test: list, *, fit: bool = True,
                       fit_bias: bool = False, bias: Mapping[str, float] | None = None,
                       plot: Path | None = None, title: str = ""
                       ) -> tuple[dict, float, dict[str, float]]:
    """{"validation": ..., "test": ...} metrics of a classification model under a label bias
    (fitted on `validation` for macro-F1 when `fit_bias`, else `bias`) and the temperature
    then fitted on `validation` (1 when not `fit`), each with its uncalibrated ECE and NLL
    beside (ece_uncalibrated, nll_uncalibrated); a reliability diagram at `plot`. Returns the
    metrics, the temperature and the bias."""
    from lorastack.train import evaluate as ev

    metrics, curves = {}, {}
    val_sums = ev.label_logprob_sums(model, fmt, validation, progress=True)
    truth_ids = [ex.label for ex in validation]
    bias = bias_map(fmt.labels, fit_label_bias(val_sums, truth_ids)) if fit_bias else \
        dict(bias or {})
    shifted = [list(label_scoring.shift(dict(zip(fmt.labels, row)), bias).values())
               for row in val_sums]
    temperature = fit_temperature(shifted, truth_ids) if fit else 1.0
    for split, examples in (("validation", validation), ("test", test)):
        if not examples:
            continue
        sums = val_sums if split == "validation" else \
            ev.label_logprob_sums(model, fmt, examples, progress=True)
        truth = [fmt.labels[ex.label] for ex in examples]
        metrics[split], probs, raw_probs = metrics_at(fmt, examples, sums, temperature, bias)
        curves[f"{split}, as scored"] = (raw_probs, truth)
        if temperature != 1.0 or bias:
            curves[f"{split}, {_described(temperature, bias)}"] = (probs, truth)
    if plot is not None:
        plot_reliability(plot, curves, f"{title}: reliability (10 confidence bins)")
    return metrics, temperature, bias


def _described(temperature: float, bias: Mapping[str, float]) -> str:
    shift = label_scoring.describe_bias(bias, digits=2)
    return f"T={temperature:.2f}" + (f", bias {shift}" if shift else "")
