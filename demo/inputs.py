"""What a person gives the page, checked and turned into what the client sends (no Gradio)."""

from __future__ import annotations


class InputError(ValueError):
    """What the person gave the page cannot be used; the message says why and what to do."""


def chosen_models(value) -> list[str]:
    """The adapter(s) picked in a dropdown, as a list (several make an ensemble)."""
    models = [value] if isinstance(value, str) else list(value or [])
    if not models:
        raise InputError("pick a classification adapter first (several make an "
                         "ensemble: their probabilities are averaged)")
    return models


def required(value: str | None, missing: str) -> str:
    """`value` without surrounding blanks; InputError(`missing`) when nothing is left."""
    text = (value or "").strip()
    if not text:
        raise InputError(missing)
    return text


def chat_messages(history: list[dict]) -> list[dict]:
    """A Chatbot's history as chat messages of plain text (Gradio may give a content as parts)."""
    return [{"role": m["role"], "content": _plain(m["content"])} for m in history]


def _plain(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content.get("text", "")) if isinstance(content, dict) else str(content)
