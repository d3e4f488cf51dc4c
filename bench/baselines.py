"""Baselines a user would try first on the drug reviews: TF-IDF + logistic regression.

    .venv/bin/python bench/baselines.py            # writes bench/results/baselines.json

Two versions, both scored on the official 379 test reviews:
- default: the tutorial recipe, TfidfVectorizer() + LogisticRegression() on all 600 train reviews;
- tuned: n-grams, sublinear tf, C and class weights chosen on the 90 validation reviews (seed 0,
  the adapter's split), trained on the other 510.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _fit_score(train, test, vec_kw, clf_kw):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    t0 = time.monotonic()
    vec = TfidfVectorizer(**vec_kw)
    clf = LogisticRegression(max_iter=2000, **clf_kw)
    clf.fit(vec.fit_transform([r["text"] for r in train]), [r["label"] for r in train])
    seconds = time.monotonic() - t0
    pred = clf.predict(vec.transform([r["text"] for r in test]))
    truth = [r["label"] for r in test]
    labels = sorted(set(truth))
    per_class = f1_score(truth, pred, labels=labels, average=None)
    return {"accuracy": accuracy_score(truth, pred),
            "macro_f1": f1_score(truth, pred, average="macro"), "train_seconds": seconds,
            "n_test": len(truth),
            **{f"f1_{label}": float(f) for label, f in zip(labels, per_class, strict=True)}}


def tfidf_baselines(seed: int = 0) -> list[dict]:
    from lorastack.train.data import load_records, load_splits

    full_train = load_records("drug-reviews", "train")
    splits = load_splits("drug-reviews", validation_fraction=0.15, seed=seed)
    default = {"method": "tfidf-logreg (default)", "settings": {},
               **_fit_score(full_train, splits.test, {}, {})}
    grid = list(itertools.product(
        [{}, {"ngram_range": (1, 2), "min_df": 2, "sublinear_tf": True}],
        [{"C": c, "class_weight": w} for c in (1.0, 10.0) for w in (None, "balanced")]))
    best = max(grid, key=lambda g: _fit_score(splits.train, splits.validation, *g)["macro_f1"])
    tuned = {"method": "tfidf-logreg (tuned on validation)",
             "settings": {**{k: list(v) if isinstance(v, tuple) else v
                             for k, v in best[0].items()}, **best[1]},
             **_fit_score(splits.train, splits.test, *best)}
    return [default, tuned]


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = tfidf_baselines()
    (RESULTS / "baselines.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        print(f"{r['method']}: accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
