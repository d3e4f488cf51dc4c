"""Label scoring: the normalisation shared by the trainer's evaluation and /v1/classify."""

from __future__ import annotations

import math

import pytest

from lorastack.adapters import labels


def test_probabilities_are_a_softmax_over_labels():
    probs = labels.probabilities({"a": math.log(0.2), "b": math.log(0.6), "c": math.log(0.2)})
    assert probs == pytest.approx({"a": 0.2, "b": 0.6, "c": 0.2})
    assert labels.predict(probs) == "b"


def test_probabilities_survive_very_negative_logprobs():
    probs = labels.probabilities({"a": -1000.0, "b": -1001.0})
    assert probs["a"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_ensemble_means_members_and_requires_one_label_set():
    mean = labels.ensemble([{"x": 0.2, "y": 0.8}, {"x": 0.6, "y": 0.4}])
    assert mean == pytest.approx({"x": 0.4, "y": 0.6})
    with pytest.raises(ValueError, match="same label set"):
        labels.ensemble([{"x": 1.0}, {"z": 1.0}])


def test_render_prompt_fills_template_inside_chat_format():
    fmt = "<s>user\n{input}</s><s>assistant\n"
    text = labels.render_prompt(fmt, "Drug: {drug} ({condition})\n{text}",
                                {"drug": "X", "condition": None, "text": "fine {braces}"})
    assert text == "<s>user\nDrug: X ()\nfine {braces}</s><s>assistant\n"


def test_label_words_default_to_labels():
    assert labels.label_words(["pos", "neg"], {"pos": "good"}) == {"pos": "good", "neg": "neg"}
