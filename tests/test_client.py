"""lorastack.client (sync and async) against the real gateway over real HTTP (uvicorn in a
thread) in front of FakeVllm (tests/serve/fake_vllm.py). What only a mock transport can stage:
tests/test_client_offline.py; the same client against the real vLLM:
tests/demo/test_client_gateway.py."""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorastack.client import (
    AsyncClient,
    Classified,
    Client,
    GatewayError,
    ModelCard,
)

SERVE_TESTS = Path(__file__).parent / "serve"
sys.path.insert(0, str(SERVE_TESTS))  # as tests/serve/conftest.py does
from fake_vllm import FakeVllm
from serve_helpers import FAKE_FINGERPRINT, write_fake_adapter

KEY, ADMIN = "client-key", "client-admin"
LABELS = ("positive", "negative", "neutral")
BASE = "smollm2-135m"


class ChatFake(FakeVllm):
    """FakeVllm answers chat in the completion shape; this one answers it as vLLM does (a
    `message`, or `delta` chunks), for the client's chat methods."""

    def _build(self):
        app = super()._build()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            model = body["model"]
            if model != self.base and model not in self.loaded:
                return JSONResponse({"error": {"message": f"The model `{model}` does not "
                                     f"exist.", "type": "NotFoundError", "code": 404}}, 404)
            words = ["hi", " from", f" {model}"]
            head = {"id": "c", "object": "chat.completion", "created": 1, "model": model}
            if not body.get("stream"):
                return {**head, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": "".join(words)}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

            async def events():
                deltas = [{"role": "assistant"}, *({"content": w} for w in words), {}]
                for delta in deltas:
                    chunk = {**head, "object": "chat.completion.chunk", "choices": [
                        {"index": 0, "delta": delta,
                         "finish_reason": None if delta else "stop"}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        app.router.routes.insert(0, app.router.routes.pop())  # before FakeVllm's own route
        return app


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, base_model):
    """The gateway on a free loopback port, keys required, over ChatFake; adapters named as
    the quickstart's (two classifiers with one label set, for ensembles)."""
    import uvicorn

    from lorastack.adapters.models import BaseModel
    from lorastack.adapters.store import AdapterStore
    from lorastack.serve.app import create_app
    from lorastack.serve.engine import Engine
    from lorastack.serve.gateway import Gateway
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_proc import free_port

    root = tmp_path_factory.mktemp("client")
    store = AdapterStore(root / "store")
    write_fake_adapter(store, "reviews-classify", labels=LABELS, tmp=root)
    write_fake_adapter(store, "reviews-classify-2", labels=LABELS, salt=1, tmp=root)
    write_fake_adapter(store, "reviews-condition", task="generation", tmp=root)
    base = BaseModel(base_model.name, base_model.path, FAKE_FINGERPRINT,
                     base_model.source)
    fake = ChatFake(base=base.name)
    engine = Engine("http://fake-vllm", transport=httpx.ASGITransport(fake.app))
    port = free_port()
    settings = ServeSettings(store=store.root, work_dir=root / "work", port=port,
                             poll_interval_s=0.05, max_prompt_tokens=64, max_model_len=128,
                             max_tokens=32, max_batch=4, max_body_bytes=4096, api_keys=[KEY],
                             admin_key=ADMIN)
    app = create_app(gateway=Gateway(settings, engines=[engine], base=base))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    with Client(url, api_key=KEY) as probe:  # the store is read in the background
        while len(probe.models()) < 4:
            assert time.monotonic() < deadline, "the adapters were not served"
            time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(30)


def _public(text):
    """FakeVllm echoes the name it was sent: an adapter's identity, name@hash (the gateway
    renames `model` fields only)."""
    if isinstance(text, list):
        return [_public(t) for t in text]
    return re.sub(r"@[0-9a-f]+", "", text)


@pytest.fixture
def gw(gateway):
    with Client(gateway, api_key=KEY, admin_key=ADMIN) as client:
        yield client


# -- the sync client against the gateway ------------------------------------------------------
def test_health_and_models(gw):
    health = gw.health()
    assert health.ok and health.status == "ok" and health.adapters == 3
    assert health.engines[0].up and health.engines[0].url == "http://fake-vllm"
    cards = gw.models()
    assert all(isinstance(c, ModelCard) for c in cards)
    assert cards[0].id == BASE and cards[0].is_base and cards[0].parent is None
    by_id = {c.id: c for c in cards}
    assert set(by_id) == {BASE, "reviews-classify", "reviews-classify-2", "reviews-condition"}
    cls = by_id["reviews-classify"]
    assert cls.task == "classification" and cls.labels == LABELS and cls.parent == BASE
    assert cls.lora["rank"] == 8 and cls.raw["id"] == "reviews-classify"
    assert by_id["reviews-condition"].task == "generation"
    assert by_id["reviews-condition"].labels == ()


def test_classify_one_batch_and_records(gw):
    answers = gw.classify("reviews-classify", ["Works great.", "Awful.", {"text": "Okay."}],
                          top_k=2)
    assert len(answers) == 3 and answers.labels == LABELS
    assert answers.model == "reviews-classify" and answers.usage.prompt_tokens > 0
    for i, a in enumerate(answers):
        assert isinstance(a, Classified) and a.index == i and a.members is None
        assert set(a.probabilities) == set(LABELS)
        assert math.isclose(sum(a.probabilities.values()), 1, abs_tol=1e-6)
        assert a.label == max(a.probabilities, key=a.probabilities.get)
        assert a.confidence == a.probabilities[a.label]
        assert [t.label for t in a.top] == sorted(LABELS, key=lambda lab: -a.probabilities[
            lab])[:2]
    [one] = gw.classify("reviews-classify", "Works great.")
    assert one.probabilities == answers[0].probabilities and len(one.top) == 3


def test_classify_an_ensemble_gives_each_members_answer(gw):
    [ens] = gw.classify(["reviews-classify", "reviews-classify-2"], "Works great.")
    assert set(ens.members) == {"reviews-classify", "reviews-classify-2"}
    for member in ens.members.values():
        assert member.label in LABELS and member.confidence == member.probabilities[
            member.label]
    for label in LABELS:  # the ensemble is the members' mean
        mean = sum(m.probabilities[label] for m in ens.members.values()) / 2
        assert math.isclose(ens.probabilities[label], mean, abs_tol=1e-6)


def test_classify_many_halves_batches_to_the_gateways_limit(gw):
    texts = [f"review {i}" for i in range(11)]
    progress = []
    many = gw.classify_many("reviews-classify", texts, batch_size=16,
                            on_batch=lambda done, total: progress.append((done, total)))
    assert progress == [(4, 11), (8, 11), (11, 11)]  # 16 and 8 refused (max_batch 4)
    assert [a.index for a in many] == list(range(11)) and many.labels == LABELS
    assert many.usage.prompt_tokens == sum(
        gw.classify("reviews-classify", texts[i:i + 4]).usage.prompt_tokens
        for i in range(0, 11, 4))
    assert len(gw.classify_many("reviews-classify", [])) == 0


def test_complete_and_chat_whole(gw):
    done = gw.complete("reviews-condition", "Drug: X\nReview: it helps", max_tokens=8)
    assert _public(done.text) == "hello from reviews-condition" and done.choices == (done.text,)
    assert done.model == "reviews-condition" and done.usage.total_tokens == 7
    reply = gw.chat(BASE, "Say hello.", max_tokens=8, temperature=None)
    assert reply.text == f"hi from {BASE}" and reply.finish_reason == "stop"
    assert reply.usage.completion_tokens == 3
    reply = gw.chat("reviews-condition", [{"role": "user", "content": "Hi"}])
    assert _public(reply.text) == "hi from reviews-condition"
    assert reply.model == "reviews-condition"
    with pytest.raises(TypeError, match="stream_complete"):
        gw.complete(BASE, "x", stream=True)


def test_streams_yield_the_pieces_as_they_come(gw):
    assert _public(list(gw.stream_complete("reviews-condition", "Hi", max_tokens=8))) == [
        "hello", " from", " reviews-condition"]
    assert list(gw.stream_chat(BASE, [{"role": "user", "content": "Hi"}])) == [
        "hi", " from", f" {BASE}"]  # the role-only and the final empty delta give no piece


def test_errors_carry_status_code_and_the_gateways_message(gw, gateway):
    with pytest.raises(GatewayError, match=r"404: model 'nope' is not served here.*"
                                           r"reviews-classify") as info:
        gw.classify("nope", "text")
    assert info.value.status == 404 and info.value.code and "nope" in info.value.message
    with pytest.raises(GatewayError, match="over the batch limit 4; split the request") as info:
        gw.classify("reviews-classify", ["x"] * 5)
    assert (info.value.status, info.value.code, info.value.param) == (400, "batch_too_large",
                                                                      "input")
    assert info.value.type == "invalid_request_error"
    with pytest.raises(GatewayError, match=f"400: '{BASE}' is the base model, which has no "
                                           f"labels"):
        gw.classify(BASE, "text")
    with pytest.raises(GatewayError, match="is a generation adapter") as info:
        gw.classify("reviews-condition", "text")
    assert info.value.code == "not_a_classifier"
    with pytest.raises(GatewayError, match="`max_tokens` is 100; the limit is 32") as info:
        list(gw.stream_complete("reviews-condition", "Hi", max_tokens=100))
    assert info.value.code == "max_tokens_too_large"
    with pytest.raises(GatewayError, match="404"):
        list(gw.stream_chat("nope", "Hi"))
    with Client(gateway, api_key="") as anonymous, \
            pytest.raises(GatewayError, match="401: missing API key.*api_key=") as info:
        anonymous.models()
    assert info.value.status == 401 and info.value.code == "missing_api_key"
    with Client(gateway, api_key=KEY, admin_key="") as user, \
            pytest.raises(GatewayError, match="403: .*admin key.*admin_key=") as info:
        user.unload("reviews-classify-2")
    assert info.value.code == "admin_key_required"
    # the page's client says what to do with the page's flags
    from lorastack.demo.app import page_client

    with page_client(gateway) as anonymous, \
            pytest.raises(GatewayError, match="401: missing API key.*--api-key"):
        anonymous.models()
    with page_client(gateway, api_key=KEY) as user, \
            pytest.raises(GatewayError, match="403: .*admin key.*--admin-key"):
        user.unload("reviews-classify-2")


def test_adapters_unload_and_load(gw):
    state = gw.adapters()
    assert state.names() == ["reviews-classify", "reviews-classify-2", "reviews-condition"]
    assert state.capacity and not state.refused and not state.unloaded
    status = state.data[0]
    assert status.identity.startswith("reviews-classify@") and status.labels == LABELS
    gone = gw.unload("reviews-classify-2")
    assert (gone.status, gone.name, gone.adapter) == ("unloaded", "reviews-classify-2", None)
    assert gone.note
    assert "reviews-classify-2" not in [c.id for c in gw.models()]
    assert gw.adapters().unloaded == ("reviews-classify-2",)
    with pytest.raises(GatewayError, match="404"):
        gw.classify("reviews-classify-2", "text")
    back = gw.load("reviews-classify-2")
    assert back.status == "loaded" and back.name == "reviews-classify-2"
    assert back.adapter.task == "classification" and back.adapter.loaded_on
    assert gw.classify("reviews-classify-2", "text")[0].label in LABELS
    with pytest.raises(GatewayError, match="404") as info:
        gw.load("not-in-the-store")
    assert info.value.code == "adapter_not_found"


def test_keys_and_url_come_from_the_environment(gateway, monkeypatch):
    monkeypatch.setenv("LORASTACK_SERVER", gateway + "/")
    monkeypatch.setenv("LORASTACK_API_KEY", KEY)
    monkeypatch.setenv("LORASTACK_ADMIN_KEY", ADMIN)
    with Client() as client:
        assert client.url == gateway and client.admin_key == ADMIN
        assert client.models()[0].id == BASE
        assert client.load("reviews-classify").status == "loaded"


def test_the_readme_examples_run_as_written(gateway, monkeypatch, capsys):
    """The examples proposed for the README (as tests/quickstart/test_readme.py runs them:
    the URL replaced; here the fake gateway's key comes from the environment)."""
    monkeypatch.setenv("LORASTACK_API_KEY", KEY)
    monkeypatch.setenv("LORASTACK_ADMIN_KEY", ADMIN)
    for i, example in enumerate(README_EXAMPLES):
        code = example.replace("http://127.0.0.1:8000", gateway)
        exec(compile(code, f"README example {i}", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert out.startswith(f"['{BASE}', 'reviews-classify'")
    assert "hi from smollm2-135m" in out and "404 model_not_found" in out
    assert "40 ('positive', 'negative', 'neutral')" in out and "unloaded loaded" in out


README_EXAMPLES = ['''
from lorastack.client import Client, GatewayError

with Client("http://127.0.0.1:8000") as gw:  # keys: api_key=, admin_key= or LORASTACK_API_KEY
    print([m.id for m in gw.models()])  # the base model first, then the adapters

    for a in gw.classify("reviews-classify", ["Works great, no side effects.", "Made me sick."]):
        print(a.label, f"{a.confidence:.0%}", a.probabilities)

    reply = gw.chat("reviews-condition", "Drug: Sumatriptan\\nReview: My migraines are gone.\\n\\n"
                    "Which condition is this medicine treating? Answer with the condition's "
                    "name only.", max_tokens=10, temperature=0)
    print(reply.text)

    for piece in gw.stream_chat("smollm2-135m", "Say hello.", max_tokens=24):
        print(piece, end="", flush=True)
    print()

    try:
        gw.classify("no-such-adapter", "It is okay.")
    except GatewayError as exc:  # status, code and the gateway's message
        print(exc.status, exc.code, exc.message)
''', '''
import asyncio

from lorastack.client import AsyncClient


async def main():
    async with AsyncClient("http://127.0.0.1:8000") as gw:
        texts = ["Works great.", "Made me sick.", "It is okay."]
        answers, done = await asyncio.gather(
            gw.classify("reviews-classify", texts, top_k=2),
            gw.complete("smollm2-135m", "The capital of France is", max_tokens=8))
        print([a.label for a in answers], [t.label for t in answers[0].top], done.text)
        async for piece in gw.stream_complete("smollm2-135m", "Once upon a time", max_tokens=24):
            print(piece, end="", flush=True)
        print()

asyncio.run(main())
''', '''
from lorastack.client import Client

with Client("http://127.0.0.1:8000") as gw:
    # an ensemble: several classifiers with one label set; the answer is their mean
    [a] = gw.classify(["reviews-classify", "reviews-classify-2"], "It is okay.")
    print(a.label, {name: m.label for name, m in a.members.items()})
    # any number of texts, split into batches the gateway accepts
    many = gw.classify_many("reviews-classify", [f"Review {i}: it helped." for i in range(40)])
    print(len(many), many.labels)
    print([(s.name, s.loaded_on) for s in gw.adapters().data])
    print(gw.unload("reviews-classify-2").status, gw.load("reviews-classify-2").status)
''']


# -- the async client -------------------------------------------------------------------------
def test_async_client_has_the_same_methods(gateway):
    async def main():
        async with AsyncClient(gateway, api_key=KEY, admin_key=ADMIN) as agw:
            health, cards = await asyncio.gather(agw.health(), agw.models())
            assert health.ok and cards[0].id == BASE
            one, ens = await asyncio.gather(
                agw.classify("reviews-classify", ["a", "b"], top_k=1),
                agw.classify(["reviews-classify", "reviews-classify-2"], "a"))
            assert len(one) == 2 and len(one[0].top) == 1 and one[0].members is None
            assert set(ens[0].members) == {"reviews-classify", "reviews-classify-2"}
            many = await agw.classify_many("reviews-classify", [str(i) for i in range(6)])
            assert [a.index for a in many] == list(range(6))
            assert [a.probabilities for a in many[:2]] == [
                a.probabilities for a in await agw.classify("reviews-classify", ["0", "1"])]
            done = await agw.complete("reviews-condition", "Hi", max_tokens=4)
            assert _public(done.text) == "hello from reviews-condition"
            assert (await agw.chat(BASE, "Hi")).text == f"hi from {BASE}"
            pieces = [p async for p in agw.stream_complete("reviews-condition", "Hi")]
            assert _public(pieces) == ["hello", " from", " reviews-condition"]
            chat = [p async for p in agw.stream_chat(BASE, "Hi")]
            assert chat == ["hi", " from", f" {BASE}"]
            assert "reviews-classify" in (await agw.adapters()).names()
            assert (await agw.unload("reviews-classify-2")).status == "unloaded"
            assert (await agw.load("reviews-classify-2")).status == "loaded"
            with pytest.raises(GatewayError, match="404: model 'nope'") as info:
                await agw.classify("nope", "x")
            assert info.value.status == 404
            with pytest.raises(GatewayError, match="the limit is 32"):
                [p async for p in agw.stream_chat(BASE, "Hi", max_tokens=99)]

    asyncio.run(main())
