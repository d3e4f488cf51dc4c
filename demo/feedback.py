"""Feedback analysis without Gradio: reading a pile of reviews (a CSV or pasted lines), turning
the answers into a table, flagging the least confident rows, summing up, writing the results."""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from lorastack.demo.inputs import InputError

TEXT_COLUMN_NAMES = ("text", "review", "comment", "feedback", "body", "content", "message")
LABEL_COLUMN_NAMES = ("label", "labels", "true_label", "true label", "gold", "target", "class",
                      "category", "sentiment")
MAX_ROWS = 5000  # a page is not a batch job: beyond this, use the HTTP API directly
NO_TRUTH = "(none)"  # the true-label column's choice for a file without true labels


def read_csv(path: str | Path) -> pd.DataFrame:
    """A CSV file as text columns; the delimiter is sniffed (comma, semicolon, tab)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    if not text.strip():
        raise InputError(f"{Path(path).name} is empty")
    try:
        sep = csv.Sniffer().sniff(text[:4096], delimiters=",;\t").delimiter
    except csv.Error:
        sep = ","
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise InputError(f"{Path(path).name} is not a CSV file the page can read ({exc})") \
            from None
    if frame.empty:
        raise InputError(f"{Path(path).name} has a header but no rows")
    return frame


def guess_text_column(frame: pd.DataFrame) -> str:
    """The column that most likely holds the reviews: a usual name, else the longest texts."""
    by_name = {str(c).strip().lower(): c for c in frame.columns}
    for name in TEXT_COLUMN_NAMES:
        if name in by_name:
            return by_name[name]
    lengths = {c: frame[c].astype(str).str.len().mean() for c in frame.columns}
    return max(lengths, key=lengths.get)


def guess_label_column(frame: pd.DataFrame, text_column: str | None = None) -> str | None:
    """The column that most likely holds the true labels (a usual name), or None."""
    by_name = {str(c).strip().lower(): c for c in frame.columns if c != text_column}
    return next((by_name[name] for name in LABEL_COLUMN_NAMES if name in by_name), None)


def labelled_from_csv(frame: pd.DataFrame, column: str, truth_column: str | None = None
                      ) -> tuple[list[str], list[str] | None]:
    """The texts of `column` (rows without text left out) and, with `truth_column`, the true
    label of each (None without it)."""
    for name in (column, truth_column):
        if name is not None and name not in frame.columns:
            raise InputError(f"the CSV has no column {name!r}; its columns are "
                             f"{list(frame.columns)}")
    texts = [str(t) for t in frame[column]]
    if truth_column is None:
        return _checked(texts), None
    kept = [(t, str(y).strip()) for t, y in zip(texts, frame[truth_column], strict=True)
            if t and t.strip()]
    checked = _checked([t for t, _ in kept])  # the same rows: kept texts are not blank
    return checked, [y for _, y in kept]


def texts_from_lines(pasted: str) -> list[str]:
    """One text per non-empty line."""
    return _checked([line for line in (pasted or "").splitlines()])


def reviews(path: str | None, column: str | None, truth_column: str | None, pasted: str | None
            ) -> tuple[list[str], list[str] | None]:
    """The texts to classify and their true labels (None without a true-label column): from
    the CSV at `path` when there is one, else one per pasted line."""
    if not path:
        return texts_from_lines(pasted), None
    truth = None if truth_column in (None, "", NO_TRUTH) else truth_column
    return labelled_from_csv(read_csv(path), column or "", truth)


def _checked(texts: list[str]) -> list[str]:
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise InputError("there is no text to classify: upload a CSV and pick its text column, "
                         "or paste one review per line")
    if len(texts) > MAX_ROWS:
        raise InputError(f"{len(texts)} texts is more than this page handles ({MAX_ROWS}); "
                         f"split the file or call POST /v1/classify directly")
    return texts


def least_confident(confidences: Sequence[float], fraction: float = 0.1,
                    below: float | None = None) -> list[bool]:
    """Which rows to flag for a human look: the `fraction` least confident (at least one row
    when fraction > 0; ties broken by position), plus every row under `below` when given."""
    n = len(confidences)
    count = min(n, math.ceil(n * fraction)) if fraction > 0 else 0
    order = sorted(range(n), key=lambda i: (confidences[i], i))
    flagged = set(order[:count])
    if below is not None:
        flagged |= {i for i, c in enumerate(confidences) if c < below}
    return [i in flagged for i in range(n)]


def results_table(texts: Sequence[str], results: Sequence, labels: Sequence[str],
                  flag_fraction: float = 0.1, truth: Sequence[str] | None = None,
                  flag_below: float | None = None) -> pd.DataFrame:
    """One row per text, the columns a reader came for first (they fit a normal screen):
    the predicted label, with `truth` the true label and whether the prediction is wrong, the
    confidence, whether to check it by hand, every label's probability; then the text, and
    the row's number in the input last. `results` are the client's `Classified` answers, in
    input order. A true label matches whatever its case; a row without one is never wrong.
    `check` flags the `flag_fraction` least confident rows, and with `flag_below` every row
    whose confidence is under it (a calibrated adapter's "below 70% sure")."""
    if len(texts) != len(results):
        raise ValueError(f"{len(texts)} texts but {len(results)} answers")
    if truth is not None and len(truth) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(truth)} true labels")
    confidences = [r.confidence for r in results]
    table = pd.DataFrame({"label": [r.label for r in results]})
    if truth is not None:
        table["true_label"] = [str(t).strip() for t in truth]
        table["wrong"] = [bool(t) and t.lower() != r.label.lower()
                          for t, r in zip(table["true_label"], results, strict=True)]
    table["confidence"] = [round(c, 4) for c in confidences]
    table["check"] = least_confident(confidences, flag_fraction, below=flag_below)
    table.attrs["flag_below"] = flag_below
    for label in labels:
        table[f"p({label})"] = [round(r.probabilities.get(label, 0.0), 4) for r in results]
    table["text"] = list(texts)
    table["row"] = range(1, len(texts) + 1)
    return table


def label_distribution(table: pd.DataFrame, labels: Sequence[str] = ()) -> pd.DataFrame:
    """How many rows got each label (labels with no row included, in the adapter's order)."""
    counts = table["label"].value_counts()
    order = list(labels) + [lab for lab in counts.index if lab not in labels]
    return pd.DataFrame({"label": order, "count": [int(counts.get(lab, 0)) for lab in order]})


def summary(table: pd.DataFrame, model: str) -> str:
    dist = label_distribution(table)
    parts = ", ".join(f"**{r.label}** {r.count} ({r.count / len(table):.0%})"
                      for r in dist.itertuples())
    flagged = int(table["check"].sum())
    below = table.attrs.get("flag_below")
    rule = "least confident" + (f" or below {below:.0%} sure" if below else "")
    text = (f"{len(table)} texts classified by `{model}`: {parts}. "
            f"{flagged} {rule} flagged for a human look (column `check`).")
    if "true_label" in table:
        known = int((table["true_label"] != "").sum())
        wrong = int(table["wrong"].sum())
        if known:
            text += (f" Against the true labels: accuracy **{(known - wrong) / known:.0%}** "
                     f"({known - wrong} of {known}), {wrong} wrong (column `wrong`).")
    return text


def write_results(table: pd.DataFrame, folder: str | Path | None = None) -> Path:
    """The results as a CSV file to download."""
    folder = Path(folder or tempfile.mkdtemp(prefix="lorastack-demo-"))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = folder / f"classified-{stamp}.csv"
    table.to_csv(path, index=False)
    return path
