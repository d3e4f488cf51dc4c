"""The page's client against the real gateway: `lorastack serve` (real vLLM, the real default
model) with a classification adapter trained for the session (tests/demo/conftest.py)."""

from __future__ import annotations

import math

import pytest

from lorastack.demo.client import GatewayClient, GatewayError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

LABELS = ["positive", "negative", "neutral"]  # the conftest adapter's
TEXTS = ["This medicine works great, my pain is gone.", "It made me sick, awful.",
         "It is okay.", "No change at all after a month.", "Best thing I have tried.",
         "Side effects were mild.", "I would not take it again."]


def test_models_lists_the_base_and_the_adapters_with_their_cards(client):
    cards = {c["id"]: c for c in client.models()}
    base = next(iter(cards))
    assert cards[base]["task"] == "generation" and cards[base]["parent"] is None
    for name in ("sentiment", "sentiment-2"):
        card = cards[name]
        assert card["task"] == "classification" and card["labels"] == LABELS
        assert card["parent"] == base and card["created"] > 0
        assert "accuracy" in card["metrics"]["validation"]


def test_classify_one_and_an_ensemble(client):
    [one] = client.classify(["sentiment"], TEXTS[0])
    assert set(one.probabilities) == set(LABELS)
    assert math.isclose(sum(one.probabilities.values()), 1, abs_tol=1e-5)
    assert one.label == max(one.probabilities, key=one.probabilities.get)
    [ens] = client.classify(["sentiment", "sentiment-2"], TEXTS[0])
    assert set(ens.members) == {"sentiment", "sentiment-2"}
    for label in LABELS:  # same weights under two names: the mean equals each member
        assert math.isclose(ens.probabilities[label], one.probabilities[label], abs_tol=1e-4)


def test_classify_many_batches_within_the_gateways_limit(client):
    progress = []
    many = client.classify_many("sentiment", TEXTS, batch_size=3,
                                on_batch=lambda done, total: progress.append((done, total)))
    assert progress == [(3, 7), (6, 7), (7, 7)]
    alone = client.classify("sentiment", TEXTS)
    assert [a.label for a in many] == [a.label for a in alone]
    for a, b in zip(many, alone):
        assert math.isclose(a.confidence, b.confidence, abs_tol=1e-4)


def test_streams_arrive_in_pieces(client):
    pieces = list(client.stream_completion("sentiment", "The capital of France is",
                                           max_tokens=12, temperature=0))
    assert len(pieces) > 1 and "".join(pieces).strip()
    base = client.models()[0]["id"]
    chat = list(client.stream_chat(base, [{"role": "user", "content": "Say hello."}],
                                   max_tokens=12, temperature=0))
    assert len(chat) > 1 and "".join(chat).strip()


def test_errors_are_the_gateways_readable_messages(client, gateway):
    with pytest.raises(GatewayError, match=r"404: model 'nope' is not served here.*sentiment"):
        client.classify("nope", "text")
    with pytest.raises(GatewayError, match="over the batch limit 8; split the request"):
        client.classify("sentiment", TEXTS + TEXTS)
    with pytest.raises(GatewayError, match="`max_tokens` is 100; the limit is 64"):
        list(client.stream_completion("sentiment", "Hi", max_tokens=100))
    base = client.models()[0]["id"]
    with pytest.raises(GatewayError, match=f"400: '{base}' is the base model, which has no "
                       f"labels"):
        client.classify(base, "text")
    no_key = GatewayClient(gateway.url)
    with pytest.raises(GatewayError, match="401: missing API key.*--api-key") as info:
        no_key.models()
    assert info.value.status == 401
    api_only = GatewayClient(gateway.url, api_key=gateway.key)
    with pytest.raises(GatewayError, match="403: .*admin key.*--admin-key"):
        api_only.unload("sentiment-2")


def test_unload_and_load_by_hand(client):
    assert client.unload("sentiment-2")["status"] == "unloaded"
    assert "sentiment-2" not in [c["id"] for c in client.models()]
    with pytest.raises(GatewayError, match="404"):
        client.classify("sentiment-2", "text")
    assert client.load("sentiment-2")["status"] == "loaded"
    assert "sentiment-2" in [c["id"] for c in client.models()]
    assert client.classify("sentiment-2", "text")[0].label in LABELS


def test_compare_streams_two_models_at_once(client):
    from lorastack.demo.app import stream_pair

    base = client.models()[0]["id"]
    steps = list(stream_pair(client, (base, "sentiment"), "Name a colour.",
                             {"max_tokens": 8, "temperature": 0}))
    assert len(steps) > 2 and steps[-1][0].strip() and steps[-1][1].strip()
    [(left, right)] = list(stream_pair(client, ("nope", "sentiment"), "Hi",
                                       {"max_tokens": 1, "temperature": 0}))[-1:]
    assert "404: model 'nope' is not served here" in left and right
