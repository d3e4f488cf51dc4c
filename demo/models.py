"""The served models as the page lists them (GET /v1/models, /v1/adapters), without Gradio: the
dropdowns' choices and values, the adapters' validation examples, the Adapters tab's table."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pandas as pd

from lorastack.client import Adapters, ModelCard


def model_choices(cards: list[ModelCard]) -> tuple[list[str], list[str]]:
    """(classifiers, every model that generates) from GET /v1/models; the base model first.
    A stored ensemble classifies only."""
    return ([c.id for c in cards if c.task == "classification"],
            [c.id for c in cards if not c.members])


def keep(value, choices: list[str], default):
    """A dropdown's value after its choices changed: what still exists, else the default."""
    if isinstance(value, list):
        kept = [v for v in value if v in choices]
        return kept or default
    return value if value in choices else default


def model_dropdowns(classifiers: list[str], every: list[str], values: Sequence | None = None
                    ) -> list[tuple]:
    """(choices, value) of the page's five model dropdowns: Classify's and Feedback's adapters,
    Generate's model, Compare's A and B. Each keeps what of `values` still exists, else shows
    what the page shows first: the first adapter, the base model, the first adapter or base."""
    base = every[0] if every else None
    firsts = (classifiers[:1], classifiers[:1], base, base, (classifiers or every or [None])[0])
    lists = (classifiers, classifiers, every, every, every)
    return [(choices, keep(value, choices, first)) for value, choices, first
            in zip(values or firsts, lists, firsts, strict=True)]


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


def refused_markdown(refused: dict[str, str]) -> str:
    """The adapters the gateway refused to serve, and why (nothing when there are none)."""
    if not refused:
        return ""
    return "\n".join(["**Refused by the gateway:**"] +
                     [f"- `{name}`: {why}" for name, why in refused.items()])


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
        if card.members:
            state = "ensemble of " + ", ".join(f"{m} ({w:.2f})" for m, w in card.members.items())
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
