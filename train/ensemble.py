"""Fit an ensemble of classification adapters on validation and write it to the store.

The members are scored on the validation split they were all selected on (each at its own
calibrated temperature, on the float base that vLLM serves). The mixture weights minimise the
validation NLL of the true labels over the simplex (weights = softmax of free parameters,
L-BFGS), or, with objective "macro_f1", the validation macro-F1 of the mixture's argmax (a
search over a grid on the simplex that includes the NLL weights, ties broken by NLL: NLL keeps
the probabilities honest, macro-F1 buys the rare classes at their expense), then one temperature is fitted on the log of the mixture (train/calibration.py). Test
metrics, when the config has a test split, are measured once, after the fit, for the ensemble
and for each member, so that the report compares them on the same examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorastack.adapters import ensembles
from lorastack.adapters.manifest import Metrics
from lorastack.adapters.store import AdapterStore
from lorastack.train.data import DataError

OBJECTIVES = ("nll", "macro_f1")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise DataError(f"unknown ensemble objective {objective!r}: use one of "
                        f"{', '.join(OBJECTIVES)}")


def fit_weights(member_probs: list[list[list[float]]], truth: list[int],
                objective: str = "nll") -> list[float]:
    """Simplex weights for sum_m w_m p_m: the mean NLL of `truth` at its minimum, or (objective
    "macro_f1") the macro-F1 of the mixture's argmax at its maximum, ties broken by NLL.

    `member_probs[m][n][k]`: member m's probability of label k for example n."""
    import numpy as np
    from scipy.optimize import minimize

    check_objective(objective)
    p = np.asarray(member_probs, dtype=np.float64)  # [M, N, K]
    y = np.asarray(truth)
    m_count = p.shape[0]
    picked = p[:, np.arange(len(y)), y]  # [M, N]: each member's probability of the truth

    def mean_nll(w: Any) -> float:
        return float(-np.log(np.maximum(w @ picked, 1e-300)).mean())

    def simplex(theta: Any) -> Any:
        w = np.exp(theta - theta.max())
        return w / w.sum()

    found = minimize(lambda t: mean_nll(simplex(t)), np.zeros(m_count), method="L-BFGS-B",
                     bounds=[(-20.0, 20.0)] * m_count)
    w = simplex(found.x)
    mean = np.full(m_count, 1.0 / m_count)
    if mean_nll(w) > mean_nll(mean):  # never worse than the plain mean
        w = mean
    if objective == "macro_f1":
        w = _best_macro_f1(p, y, [w, *_simplex_grid(m_count)], mean_nll)
    w = np.round(w, 6)
    w[np.argmax(w)] += 1.0 - w.sum()  # exactly 1 after rounding
    return [float(x) for x in w]


def _simplex_grid(m_count: int) -> list[Any]:
    """Candidate weights: a regular grid on the simplex (steps of 1/20 up to 3 members, 1/10
    for 4), a seeded Dirichlet sample beyond."""
    import itertools

    import numpy as np

    if m_count > 4:
        return list(np.random.default_rng(0).dirichlet(np.ones(m_count), size=3000))
    steps = 20 if m_count <= 3 else 10
    return [np.asarray(c, dtype=np.float64) / steps
            for c in itertools.product(range(steps + 1), repeat=m_count) if sum(c) == steps]


def _best_macro_f1(p: Any, y: Any, candidates: list[Any], mean_nll) -> Any:
    import numpy as np
    from sklearn.metrics import f1_score

    labels = list(range(p.shape[2]))
    best, key = candidates[0], (-1.0, 0.0)
    for w in candidates:
        pred = np.argmax(np.tensordot(w, p, axes=1), axis=1)
        score = (float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
                 -mean_nll(w))
        if score > key:
            best, key = w, score
    return best


def build_ensemble(name: str, members: list[str], *, store: str | Path | None = None,
                   replace: bool = False, runs_dir: str | Path = "runs",
                   objective: str = "nll") -> dict:
    """Fit and write ensemble `name` of the store's classification adapters `members`, the
    weights by `objective` (fit_weights)."""
    from lorastack.adapters.files import check_base
    from lorastack.adapters.models import resolve_base
    from lorastack.train import evaluate as ev
    from lorastack.train.assess import _load_model, config_from_manifest
    from lorastack.train.calibration import fit_temperature, plot_reliability
    from lorastack.train.examples import encode_records
    from lorastack.train.run import manifest_numbers, trained_splits

    check_objective(objective)
    adapters = AdapterStore(store)
    if len(members) < 2 or len(set(members)) != len(members):
        raise DataError(f"an ensemble needs at least two different members, got "
                        f"{', '.join(members) or 'none'}")
    resolved = [adapters.resolve(m) for m in members]
    first = resolved[0].manifest
    for adapter in resolved:
        m = adapter.manifest
        if m.task != "classification":
            raise DataError(f"{m.name!r} is a {m.task} adapter: ensembles combine "
                            "classification adapters")
        if set(m.labels) != set(first.labels):
            raise DataError(f"members need one label set: {first.name!r} has "
                            f"{list(first.labels)}, {m.name!r} has {list(m.labels)}")
        if m.base_fingerprint != first.base_fingerprint:
            raise DataError(f"members need one base model: {m.name!r} was trained on "
                            f"{m.base_model}, {first.name!r} on {first.base_model}")
    labels = list(first.labels)
    base = resolve_base(first.base_model)
    val_records = test_records = None
    scored: dict[str, dict[str, list]] = {}
    for adapter in resolved:
        m = adapter.manifest
        cfg, trained = config_from_manifest(m)
        if not trained:
            raise DataError(f"{m.name!r} was imported: lorastack does not know its validation "
                            "data, so it cannot fit an ensemble's weights with it")
        splits = trained_splits(cfg)  # the records its run selected and tested on
        if val_records is None:
            val_records, test_records = splits.validation, splits.test
            where = f"{cfg.data.source} validation ({len(val_records)} examples)" + (
                ", weights by macro-F1" if objective == "macro_f1" else "")
        elif splits.validation != val_records:
            raise DataError(f"members were selected on different validation data: "
                            f"{m.name!r}'s validation split differs from {first.name!r}'s; an "
                            "ensemble's weights are fitted on the split its members share")
        check_base(m, base.fingerprint, adapter.path / "manifest.json")
        print(f"scoring member {m.name} ...")
        model, fmt = _load_model(cfg, base.path, labels, adapter.path, m)
        val = encode_records(fmt, val_records, "validation").examples
        test = encode_records(fmt, test_records, "test").examples if (
            test_records and cfg.evaluate_test) else []
        if scored and len(val) != len(next(iter(scored.values()))["val"]):
            raise DataError(f"{m.name!r} encodes another number of validation examples than "
                            f"{first.name!r}; its members must read the same records")
        scored[m.name] = {"fmt": fmt, "val": val, "test": test}
        for split, examples in (("val", val), ("test", test)):
            if not examples:
                scored[m.name][split + "_probs"] = []
                continue
            sums = ev.label_logprob_sums(model, fmt, examples, progress=True)
            probs = ev.classification_from_scores(fmt, examples, sums, m.temperature,
                                                  m.label_bias)[1]
            scored[m.name][split + "_probs"] = [{lab: p[lab] for lab in labels} for p in probs]
        del model
    names = [a.name for a in resolved]
    fmt = scored[names[0]]["fmt"]
    val_examples = scored[names[0]]["val"]
    truth = [labels.index(fmt.labels[ex.label]) for ex in val_examples]
    weights = fit_weights([[[p[lab] for lab in labels] for p in scored[n]["val_probs"]]
                           for n in names], truth, objective)
    wmap = dict(zip(names, weights, strict=True))
    mixed_val = ensembles.mixture_rows({n: scored[n]["val_probs"] for n in names}, wmap)
    temperature = fit_temperature([list(ensembles.log_probabilities(p).values())
                                   for p in mixed_val], truth)
    metrics: dict[str, dict] = {}
    curves = {}
    per_member: dict[str, dict] = {n: {} for n in names}
    for split in ("val", "test"):
        examples = scored[names[0]][split]
        if not examples:
            continue
        key = "validation" if split == "val" else "test"
        rows = {n: scored[n][split + "_probs"] for n in names}
        metrics[key] = _metrics(fmt, examples, ensembles.mixture_rows(rows, wmap),
                                temperature)
        truth_labels = [fmt.labels[ex.label] for ex in examples]
        curves[f"{key}, mixture"] = (ensembles.mixture_rows(rows, wmap), truth_labels)
        curves[f"{key}, at T={temperature:.2f}"] = (
            ensembles.mixture_rows(rows, wmap, temperature), truth_labels)
        for n in names:
            per_member[n][key] = _metrics(fmt, examples, rows[n], 1.0)
    plot = Path(runs_dir) / name / "reliability.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    plot_reliability(plot, curves, f"ensemble {name}: {', '.join(names)}")
    manifest = ensembles.EnsembleManifest(
        name=name, labels=tuple(labels), base_model=first.base_model,
        base_fingerprint=first.base_fingerprint, temperature=temperature, fitted_on=where,
        members=tuple(ensembles.Member(adapter=a.name, weight=wmap[a.name],
                                       content_hash=a.content_hash()) for a in resolved),
        metrics=Metrics(validation=manifest_numbers(metrics.get("validation", {})),
                        test=manifest_numbers(metrics.get("test", {}))))
    path = ensembles.write(adapters.root, manifest, replace=replace)
    return {"name": name, "path": str(path), "weights": wmap, "temperature": temperature,
            "objective": objective, "metrics": metrics, "members": per_member, "plot": str(plot)}


def _metrics(fmt, examples: list, probs: list[dict[str, float]],
             temperature: float) -> dict:
    """Classification metrics of label probabilities (at `temperature`, with the uncalibrated
    ECE and NLL beside: calibration.metrics_at)."""
    from lorastack.train.calibration import metrics_at

    sums = [[ensembles.log_probabilities(p)[lab] for lab in fmt.labels] for p in probs]
    out = metrics_at(fmt, examples, sums, temperature)[0]
    out.pop("loss", None)  # the answer tokens' loss belongs to one model, not to a mixture
    return out
