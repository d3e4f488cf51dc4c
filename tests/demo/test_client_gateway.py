"""lorastack.client (the page's client) against the real gateway: `lorastack serve` (real vLLM,
the real default model) with a classification adapter trained for the session
(tests/demo/conftest.py). The same calls over FakeVllm, fast: tests/test_client.py."""

from __future__ import annotations

import asyncio
import math

import pytest

from lorastack.client import AsyncClient, GatewayError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

LABELS = ["positive", "negative", "neutral"]  # reviews-classify's (tests/conftest.py)
TEXTS = ["This medicine works great, my pain is gone.", "It made me sick, awful.",
         "It is okay.", "No change at all after a month.", "Best thing I have tried.",
         "Side effects were mild.", "I would not take it again."]


def test_health_models_and_adapters(client):
    health = client.health()
    assert health.ok and health.engines and all(e.up for e in health.engines)
    assert health.adapters >= 2  # the page's tests add one later
    cards = {c.id: c for c in client.models()}
    base = next(iter(cards))
    assert cards[base].task == "generation" and cards[base].parent is None
    assert cards[base].is_base and cards[base].max_model_len
    for name in ("sentiment", "sentiment-2"):
        card = cards[name]
        assert card.task == "classification" and list(card.labels) == LABELS
        assert card.parent == base and card.created > 0
        assert "accuracy" in card.metrics["validation"]
        assert card.lora["rank"] == 16 and card.examples  # reviews-classify.yaml's r
    state = client.adapters()
    assert {"sentiment", "sentiment-2"} <= set(state.names()) and not state.refused
    assert all(a.identity.startswith(a.name + "@") for a in state.data)


def test_classify_one_and_an_ensemble(client):
    [one] = client.classify(["sentiment"], TEXTS[0])
    assert set(one.probabilities) == set(LABELS)
    assert math.isclose(sum(one.probabilities.values()), 1, abs_tol=1e-5)
    assert one.label == max(one.probabilities, key=one.probabilities.get)
    assert one.members is None and one.top[0].label == one.label and len(one.top) == 3
    ens = client.classify(["sentiment", "sentiment-2"], TEXTS[0], top_k=1)
    assert list(ens.labels) == LABELS and ens.usage.prompt_tokens > 0
    [ens] = ens
    assert set(ens.members) == {"sentiment", "sentiment-2"} and len(ens.top) == 1
    for label in LABELS:  # same weights under two names: the mean equals each member
        assert math.isclose(ens.probabilities[label], one.probabilities[label], abs_tol=1e-4)
        for member in ens.members.values():
            assert math.isclose(member.probabilities[label], one.probabilities[label],
                                abs_tol=1e-4)


def test_classify_many_batches_within_the_gateways_limit(client):
    progress = []
    many = client.classify_many("sentiment", TEXTS, batch_size=3,
                                on_batch=lambda done, total: progress.append((done, total)))
    assert progress == [(3, 7), (6, 7), (7, 7)]
    alone = client.classify("sentiment", TEXTS)
    assert [a.label for a in many] == [a.label for a in alone]
    assert [a.index for a in many] == [a.index for a in alone] == list(range(7))
    for a, b in zip(many, alone):
        assert math.isclose(a.confidence, b.confidence, abs_tol=1e-4)
    # over the gateway's --max-batch 8: halved until it fits
    assert len(client.classify_many("sentiment", TEXTS * 2, batch_size=14)) == 14


def test_streams_arrive_in_pieces(client):
    pieces = list(client.stream_complete("sentiment", "The capital of France is",
                                         max_tokens=12, temperature=0))
    assert len(pieces) > 1 and "".join(pieces).strip()
    base = client.models()[0].id
    chat = list(client.stream_chat(base, [{"role": "user", "content": "Say hello."}],
                                   max_tokens=12, temperature=0))
    assert len(chat) > 1 and "".join(chat).strip()


def test_whole_answers_match_the_streams(client):
    base = client.models()[0].id
    done = client.complete(base, "The capital of France is", max_tokens=12, temperature=0)
    streamed = "".join(client.stream_complete(base, "The capital of France is",
                                              max_tokens=12, temperature=0))
    assert done.text == streamed and done.model == base
    assert done.finish_reason in ("stop", "length") and done.usage.completion_tokens > 0
    reply = client.chat("sentiment", "Say hello.", max_tokens=12, temperature=0)
    assert reply.text == "".join(client.stream_chat("sentiment", "Say hello.", max_tokens=12,
                                                    temperature=0))
    assert reply.model == "sentiment" and reply.text.strip()


def test_errors_are_the_gateways_readable_messages(client, page_client, gateway):
    with pytest.raises(GatewayError, match=r"404: model 'nope' is not served here.*"
                                           r"sentiment") as info:
        client.classify("nope", "text")
    assert (info.value.status, info.value.code) == (404, "model_not_found")
    with pytest.raises(GatewayError, match="over the batch limit 8; split the request") as info:
        client.classify("sentiment", TEXTS + TEXTS)
    assert info.value.code == "batch_too_large"
    with pytest.raises(GatewayError, match="`max_tokens` is 100; the limit is 64"):
        list(client.stream_complete("sentiment", "Hi", max_tokens=100))
    base = client.models()[0].id
    with pytest.raises(GatewayError, match=f"400: '{base}' is the base model, which has no "
                       f"labels"):
        client.classify(base, "text")
    # 401 and 403 (keys): tests/test_client.py, on a gateway that requires them


def test_unload_and_load_by_hand(client):
    gone = client.unload("sentiment-2")
    assert gone.status == "unloaded" and gone.name == "sentiment-2"
    assert "sentiment-2" not in [c.id for c in client.models()]
    assert "sentiment-2" in client.adapters().unloaded
    with pytest.raises(GatewayError, match="404"):
        client.classify("sentiment-2", "text")
    back = client.load("sentiment-2")
    assert back.status == "loaded" and back.adapter.loaded_on
    assert "sentiment-2" in [c.id for c in client.models()]
    assert client.classify("sentiment-2", "text")[0].label in LABELS


def test_the_async_client(gateway):
    async def main():
        async with AsyncClient(gateway.url, api_key=gateway.key,
                               admin_key=gateway.admin) as agw:
            assert (await agw.health()).ok
            base = (await agw.models())[0].id
            a, b = await asyncio.gather(agw.classify("sentiment", TEXTS[:3]),
                                        agw.classify(["sentiment", "sentiment-2"], TEXTS[0]))
            assert len(a) == 3 and set(b[0].members) == {"sentiment", "sentiment-2"}
            pieces = [p async for p in agw.stream_chat(base, "Say hello.", max_tokens=12,
                                                       temperature=0)]
            assert len(pieces) > 1
            whole = await agw.chat(base, "Say hello.", max_tokens=12, temperature=0)
            assert whole.text == "".join(pieces)
            with pytest.raises(GatewayError, match="404: model 'nope'"):
                await agw.classify("nope", "x")

    asyncio.run(main())


def test_compare_streams_two_models_at_once(page_client):
    from lorastack.demo.answers import stream_pair

    base = page_client.models()[0].id
    steps = list(stream_pair(page_client, (base, "sentiment"), "Name a colour.",
                             {"max_tokens": 8, "temperature": 0}))
    assert len(steps) > 2 and steps[-1][0].strip() and steps[-1][1].strip()
    [(left, right)] = list(stream_pair(page_client, ("nope", "sentiment"), "Hi",
                                       {"max_tokens": 1, "temperature": 0}))[-1:]
    assert "404: model 'nope' is not served here" in left and right
