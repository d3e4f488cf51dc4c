"""Label scoring: how a classification adapter's answer becomes label probabilities.

A classification adapter is a LoRA trained to answer one of its labels after a fixed prompt.
It is scored, never sampled: for every label, the log-probability of its continuation (the label
word followed by the end-of-turn token) given the prompt, summed over the continuation's tokens,
then shifted by the adapter's label bias and normalised over the label set with a softmax at
its calibrated temperature (both fitted on validation: train/calibration.py). The trainer's
evaluation, the server's /v1/classify and the benchmarks' naive server all take their token ids
from `prompt_ids` and `continuation_ids` here and their probabilities from `probabilities`, so
the accuracy the trainer reports is the accuracy the server delivers.

Pure Python: a tokenizer (Hugging Face's call interface) is passed in, and the engines (torch in
train, vLLM in serve) produce the log-probabilities.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from typing import Any

INPUT_SLOT = "{input}"


def label_words(labels: Sequence[str], words: Mapping[str, str] | None = None) -> dict[str, str]:
    """The text the model answers for each label (the label itself unless mapped)."""
    words = dict(words or {})
    return {label: words.get(label, label) for label in labels}


def render_prompt(chat_format: str, user_template: str, record: Mapping[str, object]) -> str:
    """The full prompt text: the user template filled from `record`, inside the chat format.

    `chat_format` is the base model's chat template rendered around the slot `{input}` (the
    manifest stores it), so serving needs no tokenizer or template engine to rebuild a prompt.
    Missing or None fields render as empty strings.
    """
    user = user_template.format_map(_Fields(record))
    return chat_format.replace(INPUT_SLOT, user, 1)


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` tokenized on its own, without special tokens (the chat format holds them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, chat_format: str, prompt_template: str,
               record: Mapping[str, object]) -> list[int]:
    """The token ids of the prompt a label continuation is scored after (see render_prompt)."""
    return token_ids(tokenizer, render_prompt(chat_format, prompt_template, record))


def continuation_ids(tokenizer: Any, words: Mapping[str, str], end_of_turn: str,
                     with_end: bool) -> dict[str, list[int]]:
    """label -> the token ids scored after the prompt: its word (`words[label]`), then, when
    `with_end`, the end-of-turn marker. Each piece is tokenized on its own, apart from the
    prompt and from each other, so that every label's tokens are the same after any prompt."""
    end = token_ids(tokenizer, end_of_turn) if with_end else []
    return {label: token_ids(tokenizer, word) + end for label, word in words.items()}


def label_continuations(tokenizer: Any, manifest: Any) -> dict[str, list[int]]:
    """continuation_ids of a classification adapter's manifest, in its label order."""
    words = {label: manifest.label_word(label) for label in manifest.labels}
    return continuation_ids(tokenizer, words, manifest.end_of_turn, manifest.score_end_of_turn)


def pad_id(tokenizer: Any, end_of_turn_id: int | None = None) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS, else the
    end-of-turn marker's (padding is masked, so any id is right; this is the one choice)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, end_of_turn_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has no pad or EOS token; pass the end-of-turn token's id")


def template_fields(user_template: str) -> list[str]:
    """The record fields `user_template` fills in, in order of first use ("{text} {drug}" ->
    ["text", "drug"]); `{text[0]}` or `{text!r}` count as `text`."""
    fields: list[str] = []
    for _, name, _, _ in string.Formatter().parse(user_template):
        if name:
            root = name.split(".", 1)[0].split("[", 1)[0]
            if root and root not in fields:
                fields.append(root)
    return fields


def probabilities(logprob_sums: Mapping[str, float], temperature: float = 1.0,
                  bias: Mapping[str, float] | None = None) -> dict[str, float]:
    """Softmax over the labels' summed log-probabilities, each plus its `bias` (a label
    missing from it: 0), divided by `temperature`: the adapter's calibration
    (manifest.label_bias and manifest.temperature; none and 1 leave them as scored).
    Numerically stable."""
    if not logprob_sums:
        raise ValueError("no labels to score")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    shifted = shift(logprob_sums, bias)
    top = max(shifted.values())
    exps = {label: math.exp((lp - top) / temperature) for label, lp in shifted.items()}
    total = sum(exps.values())
    return {label: e / total for label, e in exps.items()}


def shift(logprob_sums: Mapping[str, float],
          bias: Mapping[str, float] | None) -> dict[str, float]:
    """Each label's score plus its `bias` (a label missing from it: 0)."""
    return {label: lp + (bias or {}).get(label, 0.0) for label, lp in logprob_sums.items()}


def describe_bias(bias: Mapping[str, float], digits: int = 3) -> str:
    """"negative -0.085, neutral +0.560": a label bias as people read it."""
    return ", ".join(f"{label} {b:+.{digits}f}" for label, b in bias.items())


def predict(probs: Mapping[str, float]) -> str:
    """The most probable label (the first in order on a tie)."""
    return max(probs, key=lambda label: probs[label])


def ensemble(members: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of several members' label probabilities (members must share the label set)."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    labels = list(members[0])
    if any(set(m) != set(labels) for m in members):
        raise ValueError("ensemble members must have the same label set")
    return {label: sum(m[label] for m in members) / len(members) for label in labels}


class _Fields(dict):
    """format_map mapping: record fields, with None and missing fields as ''."""

    def __init__(self, record: Mapping[str, object]):
        super().__init__({k: ("" if v is None else v) for k, v in record.items()})

    def __missing__(self, key: str) -> str:
        return ""
