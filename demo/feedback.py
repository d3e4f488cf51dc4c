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

TEXT_COLUMN_NAMES = ("text", "review", "comment", "feedback", "body", "content", "message")
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


def texts_from_csv(frame: pd.DataFrame, column: str) -> list[str]:
    if column not in frame.columns:
        raise InputError(f"the CSV has no column {column!r}; its columns are "
                         f"{list(frame.columns)}")
    return _checked([str(t) for t in frame[column]])


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
                  flag_fraction: float = 0.1) -> pd.DataFrame:
    """One row per text: text, label, confidence, whether to check it by hand, and every
    label's probability. `results` are the client's `Classified` answers, in input order."""
    if len(texts) != len(results):
        raise ValueError(f"{len(texts)} texts but {len(results)} answers")
    confidences = [r.confidence for r in results]
    table = pd.DataFrame({
        "row": range(1, len(texts) + 1), "text": list(texts),
        "label": [r.label for r in results],
        "confidence": [round(c, 4) for c in confidences],
        "check": least_confident(confidences, flag_fraction)})
    for label in labels:
        table[f"p({label})"] = [round(r.probabilities.get(label, 0.0), 4) for r in results]
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
    return (f"{len(table)} texts classified by `{model}`: {parts}. "
            f"{flagged} least confident flagged for a human look (column `check`).")


def write_results(table: pd.DataFrame, folder: str | Path | None = None) -> Path:
    """The results as a CSV file to download."""
    folder = Path(folder or tempfile.mkdtemp(prefix="lorastack-demo-"))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = folder / f"classified-{stamp}.csv"
    table.to_csv(path, index=False)
    return path


def models_table(cards: Sequence[dict], status: dict | None = None) -> pd.DataFrame:
    """GET /v1/models cards (plus GET /v1/adapters' load state) as the Adapters tab's table."""
    loaded = {a["name"]: a for a in (status or {}).get("data", [])}
    unloaded = set((status or {}).get("unloaded", []))
    rows = []
    for card in cards:
        name = card["id"]
        metrics = card.get("metrics") or {}
        state = ("base model" if card.get("parent") is None else
                 "unloaded by hand" if name in unloaded else
                 f"loaded ({len(loaded[name]['loaded_on'])} engine(s), "
                 f"{loaded[name]['inflight']} in flight)"
                 if name in loaded and loaded[name].get("loaded_on") else "served (lazy)")
        rows.append({"name": name, "state": state, "task": card.get("task", ""),
                     "base": card.get("parent") or "",
                     "labels": ", ".join(card.get("labels") or []),
                     "validation": format_metrics(metrics.get("validation")),
                     "test": format_metrics(metrics.get("test")),
                     "created": _date(card.get("created"))})
    listed = {card["id"] for card in cards}
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


def adapter_examples(cards: list[dict], models: list[str], n: int = 6) -> list[str]:
    """Validation inputs the gateway lists for the chosen adapters (model cards' `examples`),
    in order, without repeats."""
    out: list[str] = []
    for card in cards:
        if card.get("id") in models:
            for text in card.get("examples") or []:
                if isinstance(text, str) and text not in out:
                    out.append(text)
    return out[:n]
