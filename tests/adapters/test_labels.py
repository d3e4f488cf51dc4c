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


class WordTokenizer:
    """One id per whitespace-separated piece, as a Hugging Face tokenizer is called; special
    tokens (a BOS id 0) only when asked for."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_prompt_ids_tokenize_the_rendered_prompt_without_special_tokens():
    tok = WordTokenizer()
    ids = labels.prompt_ids(tok, "<u> {input} </u> <a>", "Review: {text}", {"text": "so good"})
    assert ids == tok("<u> Review: so good </u> <a>", add_special_tokens=False)["input_ids"]
    assert 0 not in ids and labels.token_ids(tok, "") == []


def test_continuations_are_word_then_end_of_turn_each_tokenized_alone():
    tok = WordTokenizer()
    words = {"pos": "very good", "neg": "bad"}
    with_end = labels.continuation_ids(tok, words, "<end>", with_end=True)
    end = labels.token_ids(tok, "<end>")
    assert with_end == {"pos": labels.token_ids(tok, "very good") + end,
                        "neg": labels.token_ids(tok, "bad") + end}
    assert list(with_end) == ["pos", "neg"]  # the label order is kept
    assert labels.continuation_ids(tok, words, "<end>", with_end=False) == \
        {label: ids[:-1] for label, ids in with_end.items()}


def test_label_continuations_follow_the_manifest(fake):
    tok = WordTokenizer()
    manifest = fake.make_manifest("r", label_words={"positive": "good"}, end_of_turn="<end>")
    assert labels.label_continuations(tok, manifest) == \
        labels.continuation_ids(tok, {"negative": "negative", "positive": "good"}, "<end>", False)
    scored_end = fake.make_manifest("r", end_of_turn="<end>", score_end_of_turn=True)
    assert labels.label_continuations(tok, scored_end) == \
        labels.continuation_ids(tok, {"negative": "negative", "positive": "positive"}, "<end>",
                                True)


def test_pad_id_is_one_choice_for_the_trainer_and_the_export_check():
    from types import SimpleNamespace as Tok

    assert labels.pad_id(Tok(pad_token_id=3, eos_token_id=2), 7) == 3
    assert labels.pad_id(Tok(pad_token_id=None, eos_token_id=2), 7) == 2
    assert labels.pad_id(Tok(pad_token_id=None, eos_token_id=None), 7) == 7
    with pytest.raises(ValueError, match="no pad or EOS token"):
        labels.pad_id(Tok(pad_token_id=None, eos_token_id=None))
