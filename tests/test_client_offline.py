"""lorastack.client without a gateway: what only a mock transport can stage (a stream cut by
an error event, garbage on the wire, a batch limit), an unreachable port, and the import's
weight. Against the real gateway: tests/test_client.py; against the real vLLM:
tests/demo/test_client_gateway.py."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import httpx
import pytest

from lorastack.client import AsyncClient, Client, GatewayError, sse_events


def _sse(*events: str) -> httpx.MockTransport:
    return httpx.MockTransport(lambda req: httpx.Response(
        200, text="".join(f"data: {e}\n\n" for e in events),
        headers={"content-type": "text/event-stream"}))


CUT = ['{"choices": [{"text": "Hel"}]}', '{"choices": [{"text": "lo"}]}',
       json.dumps({"error": {"message": "the stream was cut: vLLM failed mid-answer; retry",
                             "type": "service_unavailable", "code": "engine_unavailable",
                             "param": None}})]


def test_an_error_event_mid_stream_raises_after_the_pieces_before_it():
    got = []
    with Client("http://gw", transport=_sse(*CUT)) as client, \
            pytest.raises(GatewayError, match="503: the stream was cut") as info:
        got.extend(client.stream_complete("m", "p"))
    assert got == ["Hel", "lo"]
    assert (info.value.status, info.value.code) == (503, "engine_unavailable")

    async def main():
        pieces = []
        async with AsyncClient("http://gw", transport=httpx.MockTransport(
                lambda req: httpx.Response(200, text="".join(f"data: {e}\n\n" for e in CUT)))
                ) as client:
            with pytest.raises(GatewayError, match="the stream was cut"):
                async for piece in client.stream_complete("m", "p"):
                    pieces.append(piece)
        return pieces

    assert asyncio.run(main()) == ["Hel", "lo"]


def test_the_killer_of_the_engine_is_a_500_in_the_stream():
    event = '{"error": {"message": "this request killed the engine", "type": "server_error", ' \
            '"code": "engine_died"}}'
    with Client("http://gw", transport=_sse(event)) as client, \
            pytest.raises(GatewayError) as info:
        list(client.stream_chat("m", "hi"))
    assert (info.value.status, info.value.code) == (500, "engine_died")


def test_sse_events_stop_at_done_and_refuse_garbage():
    lines = [": comment", "", 'data: {"a": 1}', "data: [DONE]", 'data: {"b": 2}']
    assert list(sse_events(iter(lines))) == [{"a": 1}]
    with pytest.raises(GatewayError, match="not JSON"):
        list(sse_events(iter(["data: {oops"])))


def test_error_shapes_and_hints():
    e = GatewayError.from_response(404, json.dumps({"error": {
        "message": "model 'x' is not served here", "type": "not_found_error",
        "code": "model_not_found", "param": "model"}}))
    assert str(e) == "gateway error 404: model 'x' is not served here"
    assert (e.status, e.code, e.type, e.param) == (404, "model_not_found", "not_found_error",
                                                   "model")
    assert "api_key=" in str(GatewayError.from_response(401, b'{"error": {"message": "m"}}'))
    page = {401: "start the page with --api-key"}
    assert str(GatewayError.from_response(401, b'{"error": {"message": "m"}}', page)) == \
        "gateway error 401: m (start the page with --api-key)"
    assert str(GatewayError.from_response(422, '{"detail": "bad field"}')) == \
        "gateway error 422: bad field"
    fastapi = {"detail": [{"type": "missing", "loc": ["body", "name"], "msg": "Field required"}]}
    assert GatewayError.from_response(422, json.dumps(fastapi)).message == \
        "body.name: Field required"
    vllm = GatewayError.from_response(400, '{"object": "error", "message": "bad", "code": 400}')
    assert vllm.message == "bad" and vllm.code == "400"
    assert str(GatewayError.from_response(502, "<html>\n  Bad   gateway</html>")) == \
        "gateway error 502: <html> Bad gateway</html>"
    assert str(GatewayError("cannot reach it")) == "cannot reach it"


def test_not_json_success_is_an_error():
    transport = httpx.MockTransport(lambda req: httpx.Response(200, text="<html>proxy</html>"))
    with Client("http://gw", transport=transport) as client, \
            pytest.raises(GatewayError, match="not JSON") as info:
        client.models()
    assert info.value.status == 200


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_gateway_is_a_readable_error():
    client = Client(f"http://127.0.0.1:{_closed_port()}", api_key="")
    for call in (client.health, client.models, lambda: client.classify("m", "t"),
                 lambda: list(client.stream_chat("m", "hi"))):
        with pytest.raises(GatewayError, match=r"cannot reach the gateway at http://127.0.0.1:"
                                               r"\d+ .*is `lorastack serve` running") as info:
            call()
        assert info.value.status is None and info.value.code == "unreachable"

    async def main():
        async with AsyncClient(f"http://127.0.0.1:{_closed_port()}") as aclient:
            with pytest.raises(GatewayError, match="cannot reach"):
                await aclient.models()
            with pytest.raises(GatewayError, match="cannot reach"):
                [p async for p in aclient.stream_complete("m", "p")]

    asyncio.run(main())


def test_import_is_light():
    code = ("import sys, lorastack.client; print(','.join(m for m in sys.modules if m.split('.')"
            "[0] in ('torch', 'gradio', 'fastapi', 'transformers', 'pandas', 'numpy') or "
            "m.startswith(('lorastack.serve', 'lorastack.adapters', 'lorastack.demo'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def _classifier(limit: int, sizes: list[int]) -> httpx.MockTransport:
    """/v1/classify that refuses more than `limit` inputs as the gateway does."""
    def answer(request):
        n = len(json.loads(request.content)["input"])
        sizes.append(n)
        if n > limit:
            return httpx.Response(400, json={"error": {
                "message": f"{n} inputs is over the batch limit {limit}; split the request",
                "type": "invalid_request_error", "code": "batch_too_large", "param": "input"}})
        return httpx.Response(200, json={"model": "m", "labels": ["a", "b"], "data": [
            {"index": i, "label": "a", "probabilities": {"a": 0.6, "b": 0.4}}
            for i in range(n)], "usage": {"prompt_tokens": n, "total_tokens": n}})
    return httpx.MockTransport(answer)


def test_classify_many_batches_reports_progress_and_halves_over_the_limit():
    sizes, progress = [], []
    with Client("http://gw", transport=_classifier(16, sizes)) as client:
        out = client.classify_many("m", [str(i) for i in range(7)], 3,
                                   on_batch=lambda d, t: progress.append((d, t)))
    assert sizes == [3, 3, 1] and progress == [(3, 7), (6, 7), (7, 7)]
    assert [a.index for a in out] == list(range(7)) and out.usage.prompt_tokens == 7
    sizes = []
    with Client("http://gw", transport=_classifier(3, sizes)) as client:
        assert len(client.classify_many("m", [str(i) for i in range(9)], 16)) == 9
        assert sizes == [9, 8, 4, 2, 2, 2, 2, 1]
        with pytest.raises(GatewayError, match="over the batch limit 3") as info:
            client.classify("m", ["x"] * 5)
        assert info.value.code == "batch_too_large" and info.value.status == 400
    sizes = []
    with Client("http://gw", transport=_classifier(0, sizes)) as client, \
            pytest.raises(GatewayError, match="over the batch limit 0"):
        client.classify_many("m", ["x", "y"], 2)  # even one input refused: no endless loop
    assert sizes == [2, 1]
