"""The page's logic apart from Gradio and HTTP: reading a pile of reviews, turning answers into
tables, flagging the least confident rows, writing the results. Plain functions, tested alone."""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from lorastack.client import Adapters, ModelCard

TEXT_COLUMN_NAMES = ("text", "review", "comment", "feedback", "body", "content", "message")
LABEL_COLUMN_NAMES = ("label", "labels", "true_label", "true label", "gold", "target", "class",
                      "category", "sentiment")
MAX_ROWS = 5000  # a page is not a batch job: beyond this, use the HTTP API directly


class InputError(ValueError):
    """What the person gave the page cannot be used; the message says why and what to do."""


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
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
        sep = dialect.delimiter
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


def texts_from_csv(frame: pd.DataFrame, column: str) -> list[str]:
    return labelled_from_csv(frame, column)[0]


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
    kept = [(t, str(y).strip()) for t, y in zip(texts, frame[truth_column])
            if t and t.strip()]
    checked = _checked([t for t, _ in kept])  # the same rows: kept texts are not blank
    return checked, [y for _, y in kept]


def texts_from_lines(pasted: str) -> list[str]:
    """One text per non-empty line."""
    return _checked([line for line in (pasted or "").splitlines()])


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
                  flag_fraction: float = 0.1, truth: Sequence[str] | None = None
                  ) -> pd.DataFrame:
    """One row per text, the columns a reader came for first (they fit a normal screen):
    the predicted label, with `truth` the true label and whether the prediction is wrong, the
    confidence, whether to check it by hand, every label's probability; then the text, and
    the row's number in the input last. `results` are the client's `Classified` answers, in
    input order. A true label matches whatever its case; a row without one is never wrong."""
    if len(texts) != len(results):
        raise ValueError(f"{len(texts)} texts but {len(results)} answers")
    if truth is not None and len(truth) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(truth)} true labels")
    confidences = [r.confidence for r in results]
    table = pd.DataFrame({"label": [r.label for r in results]})
    if truth is not None:
        table["true_label"] = [str(t).strip() for t in truth]
        table["wrong"] = [bool(t) and t.lower() != r.label.lower()
                          for t, r in zip(table["true_label"], results)]
    table["confidence"] = [round(c, 4) for c in confidences]
    table["check"] = least_confident(confidences, flag_fraction)
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
    text = (f"{len(table)} texts classified by `{model}`: {parts}. "
            f"{flagged} least confident flagged for a human look (column `check`).")
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


def models_table(cards: Sequence[ModelCard], status: Adapters | None = None) -> pd.DataFrame:
    """GET /v1/models cards (plus GET /v1/adapters' load state) as the Adapters tab's table."""
    loaded = {a.name: a for a in status.data} if status else {}
    unloaded = set(status.unloaded) if status else set()
    rows = []
    for card in cards:
        name = card.id
        state = ("base model" if card.is_base else
                 "unloaded by hand" if name in unloaded else
                 f"loaded ({len(loaded[name].loaded_on)} engine(s), "
                 f"{loaded[name].inflight} in flight)"
                 if name in loaded and loaded[name].loaded_on else "served (lazy)")
        rows.append({"name": name, "state": state, "task": card.task,
                     "base": card.parent or "", "labels": ", ".join(card.labels),
                     "validation": format_metrics(card.metrics.get("validation")),
                     "test": format_metrics(card.metrics.get("test")),
                     "created": _date(card.created)})
    listed = {card.id for card in cards}
    for name in sorted(unloaded - listed):  # not served, but the admin may load it again
        rows.append({"name": name, "task": "", "base": "", "labels": "", "validation": "",
                     "test": "", "created": "", "state": "unloaded by hand"})
    return pd.DataFrame(rows, columns=["name", "state", "task", "base", "labels", "validation",
                                       "test", "created"])


def format_metrics(metrics: dict | None) -> str:
    if not metrics:
        return ""
    return ", ".join(f"{k} {_number(v)}" for k, v in metrics.items()
                     if not isinstance(v, (dict, list)))


def _number(value) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, float) else str(value)


def _date(epoch) -> str:
    if not isinstance(epoch, (int, float)) or epoch <= 0:
        return ""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def adapter_examples(cards: Sequence[ModelCard], models: list[str], n: int = 6) -> list[str]:
    """Validation inputs the gateway lists for the chosen adapters (model cards' `examples`),
    in order, without repeats (texts only: the page has one text box)."""
    out: list[str] = []
    for card in cards:
        if card.id in models:
            for text in card.examples:
                if isinstance(text, str) and text not in out:
                    out.append(text)
    return out[:n]
