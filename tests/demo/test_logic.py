"""The page's logic without a server: CSV reading, flagging, tables, error messages, SSE parsing,
the client's failures when the gateway is down, and the page building against a dead gateway."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest

from lorastack.demo import feedback
from lorastack.demo.client import (
    Classified,
    GatewayClient,
    GatewayError,
    error_message,
    sse_events,
)


def _csv(tmp_path, text: str, name="reviews.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_csv_with_comma_quotes_and_bom(tmp_path):
    path = _csv(tmp_path, '\ufeffid,Review,stars\n1,"Great, works",5\n2,"Bad ""really""",1\n')
    frame = feedback.read_csv(path)
    assert list(frame.columns) == ["id", "Review", "stars"]
    assert feedback.guess_text_column(frame) == "Review"
    assert feedback.texts_from_csv(frame, "Review") == ["Great, works", 'Bad "really"']


def test_csv_semicolon_and_guess_by_length(tmp_path):
    frame = feedback.read_csv(_csv(tmp_path, "n;what people said\n1;It helped me a lot\n"
                                             "2;It did nothing for my headaches\n"))
    assert list(frame.columns) == ["n", "what people said"]
    assert feedback.guess_text_column(frame) == "what people said"


def test_csv_errors_are_readable(tmp_path):
    with pytest.raises(feedback.InputError, match="empty"):
        feedback.read_csv(_csv(tmp_path, "  \n"))
    with pytest.raises(feedback.InputError, match="no rows"):
        feedback.read_csv(_csv(tmp_path, "text,stars\n", "header.csv"))
    frame = feedback.read_csv(_csv(tmp_path, "text,stars\n  ,1\n,2\n", "blank.csv"))
    with pytest.raises(feedback.InputError, match="no column 'review'.*text"):
        feedback.texts_from_csv(frame, "review")
    with pytest.raises(feedback.InputError, match="no text to classify"):
        feedback.texts_from_csv(frame, "text")


def test_pasted_lines_skip_blanks_and_cap_the_size():
    assert feedback.texts_from_lines("a\n\n  b  \n\n") == ["a", "b"]
    with pytest.raises(feedback.InputError, match="no text"):
        feedback.texts_from_lines("\n \n")
    with pytest.raises(feedback.InputError, match="more than this page handles"):
        feedback.texts_from_lines("x\n" * (feedback.MAX_ROWS + 1))


def test_least_confident_flags_the_lowest_fraction_and_threshold():
    conf = [0.9, 0.4, 0.8, 0.4, 0.99, 0.7, 0.95, 0.6, 0.85, 0.97]
    assert feedback.least_confident(conf, 0.2) == [i in (1, 3) for i in range(10)]
    # ties at the cut: the earlier row wins; at least one row for any fraction > 0
    assert feedback.least_confident([0.5, 0.5, 0.9], 0.1) == [True, False, False]
    assert feedback.least_confident(conf, 0.0) == [False] * 10
    assert feedback.least_confident(conf, 0.0, below=0.65) == [c < 0.65 for c in conf]
    assert feedback.least_confident([], 0.5) == []


def _answers():
    return [Classified("positive", {"positive": 0.9, "negative": 0.1}),
            Classified("negative", {"positive": 0.45, "negative": 0.55}),
            Classified("positive", {"positive": 0.7, "negative": 0.3})]


def test_results_table_distribution_summary_and_csv(tmp_path):
    table = feedback.results_table(["a", "b", "c"], _answers(), ["positive", "negative"], 0.3)
    assert list(table.columns) == ["row", "text", "label", "confidence", "check",
                                   "p(positive)", "p(negative)"]
    assert table["check"].tolist() == [False, True, False]
    assert table["confidence"].tolist() == [0.9, 0.55, 0.7]
    dist = feedback.label_distribution(table, ["positive", "negative", "neutral"])
    assert dist.to_dict("list") == {"label": ["positive", "negative", "neutral"],
                                    "count": [2, 1, 0]}
    text = feedback.summary(table, "m")
    assert "3 texts" in text and "**positive** 2 (67%)" in text and "1 least confident" in text
    path = feedback.write_results(table, tmp_path)
    assert path.read_text().splitlines()[0] == "row,text,label,confidence,check,p(positive)," \
                                                "p(negative)"
    assert len(path.read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="2 texts but 3 answers"):
        feedback.results_table(["a", "b"], _answers(), ["positive"])


def test_models_table_reads_cards_and_load_state():
    cards = [{"id": "base", "task": "generation", "parent": None, "created": 0},
             {"id": "s", "task": "classification", "parent": "base", "labels": ["a", "b"],
              "metrics": {"validation": {"accuracy": 0.75, "n": 8.0}, "test": {"f1": 1}},
              "created": 1_700_000_000},
             {"id": "g", "task": "generation", "parent": "base", "created": 1_700_000_000}]
    status = {"data": [{"name": "s", "loaded_on": ["http://x"], "inflight": 2}],
              "unloaded": ["g", "h"]}
    rows = feedback.models_table(cards, status).to_dict("records")
    assert rows[0]["state"] == "base model" and rows[0]["created"] == ""
    assert rows[1]["labels"] == "a, b" and rows[1]["validation"] == "accuracy 0.750, n 8"
    assert rows[1]["test"] == "f1 1" and list(rows[0])[:2] == ["name", "state"]
    assert rows[1]["state"].startswith("loaded (1 engine") and "2 in flight" in rows[1]["state"]
    assert rows[1]["created"] == "2023-11-14 22:13 UTC"
    assert rows[2]["state"] == "unloaded by hand"
    assert rows[3]["name"] == "h" and rows[3]["state"] == "unloaded by hand" and len(rows) == 4


def test_error_message_prefers_the_gateways_message_and_adds_a_hint():
    body = json.dumps({"error": {"message": "model 'x' is not served here", "code": "c"}})
    assert error_message(404, body) == "gateway error 404: model 'x' is not served here"
    assert "--api-key" in error_message(401, b'{"error": {"message": "missing API key"}}')
    assert "--admin-key" in error_message(403, b'{"error": {"message": "needs admin"}}')
    assert error_message(422, '{"detail": "bad field"}') == "gateway error 422: bad field"
    assert error_message(502, "<html>\n  Bad   gateway</html>") == \
        "gateway error 502: <html> Bad gateway</html>"


def test_sse_events_stop_at_done_and_refuse_garbage():
    lines = [": comment", "", 'data: {"a": 1}', "data: [DONE]", 'data: {"b": 2}']
    assert list(sse_events(iter(lines))) == [{"a": 1}]
    with pytest.raises(GatewayError, match="not JSON"):
        list(sse_events(iter(["data: {oops"])))


def test_stream_surfaces_an_error_event_mid_stream():
    chunks = ['data: {"choices": [{"text": "Hel"}]}', 'data: {"choices": [{"text": "lo"}]}',
              'data: {"error": {"message": "the stream was cut: vLLM failed"}}']
    transport = httpx.MockTransport(lambda req: httpx.Response(
        200, text="\n\n".join(chunks) + "\n\n", headers={"content-type": "text/event-stream"}))
    client = GatewayClient("http://gw", transport=transport)
    got = []
    with pytest.raises(GatewayError, match="the stream was cut"):
        got.extend(client.stream_completion("m", "p"))
    assert got == ["Hel", "lo"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_gateway_is_a_readable_error():
    client = GatewayClient(f"http://127.0.0.1:{_closed_port()}")
    for call in (client.models, lambda: client.classify("m", "t"),
                 lambda: list(client.stream_chat("m", [{"role": "user", "content": "hi"}]))):
        with pytest.raises(GatewayError, match="cannot reach the gateway at http://127.0.0.1:"
                                               r"\d+ .*is `lorastack serve` running"):
            call()


def test_classify_many_batches_and_reports_progress():
    sizes = []

    def answer(request):
        body = json.loads(request.content)
        sizes.append(len(body["input"]))
        return httpx.Response(200, json={"data": [
            {"label": "a", "probabilities": {"a": 0.6, "b": 0.4}} for _ in body["input"]]})

    client = GatewayClient("http://gw", transport=httpx.MockTransport(answer))
    progress = []
    out = client.classify_many("m", [str(i) for i in range(7)], 3,
                               on_batch=lambda d, t: progress.append((d, t)))
    assert sizes == [3, 3, 1] and progress == [(3, 7), (6, 7), (7, 7)] and len(out) == 7


def test_page_helpers():
    from lorastack.demo import app

    cards = [{"id": "base", "task": "generation"}, {"id": "c", "task": "classification"}]
    assert app.model_choices(cards) == (["c"], ["base", "c"])
    assert app.keep(["c", "gone"], ["c"], []) == ["c"]
    assert app.keep(["gone"], ["c"], ["c"]) == ["c"]
    assert app.keep("gone", ["base"], "base") == "base"
    with pytest.raises(feedback.InputError, match="pick a classification adapter"):
        app.as_models([])
    md = app.prediction_markdown(["a", "b"], Classified(
        "pos", {"pos": 0.8, "neg": 0.2},
        {"a": {"label": "pos", "probabilities": {"pos": 0.9, "neg": 0.1}},
         "b": {"label": "neg", "probabilities": {"pos": 0.3, "neg": 0.7}}}))
    assert "Predicted: **pos** (80.0%)" in md and "ensemble" in md and "`b`: neg (70.0%)" in md


def test_handlers_turn_gateway_errors_into_gradio_errors():
    import gradio as gr

    from lorastack.demo.app import shown

    @shown
    def plain():
        raise GatewayError("gateway error 404: <model> 'x' is not served here", 404)

    @shown
    def streaming():
        yield 1
        raise feedback.InputError("type a text")

    with pytest.raises(gr.Error) as info:
        plain()
    assert info.value.message == "gateway error 404: &lt;model&gt; 'x' is not served here"
    gen = streaming()
    assert next(gen) == 1
    with pytest.raises(gr.Error, match="type a text"):
        next(gen)


def test_page_builds_against_a_dead_gateway_and_says_so():
    from lorastack.demo.app import build_page

    page = build_page(GatewayClient(f"http://127.0.0.1:{_closed_port()}"))
    status = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "status")
    assert "cannot reach the gateway" in status.value
    tabs = [b.label for b in page.blocks.values() if type(b).__name__ == "Tab"]
    assert tabs == ["Classify", "Feedback analysis", "Generate", "Compare", "Adapters"]


def test_demo_command_is_registered_without_importing_gradio():
    code = ("import sys, lorastack.cli; "
            "print(','.join(m for m in ('gradio', 'httpx', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    helped = subprocess.run([sys.executable, "-m", "lorastack", "demo", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--server", "--api-key", "--admin-key", "--port", "--host"):
        assert flag in helped.stdout


def test_classify_many_halves_batches_over_the_gateways_limit():
    sizes = []

    def answer(request):
        n = len(json.loads(request.content)["input"])
        sizes.append(n)
        if n > 3:
            return httpx.Response(400, json={"error": {
                "message": f"{n} inputs is over the batch limit 3; split the request",
                "code": "batch_too_large"}})
        return httpx.Response(200, json={"data": [
            {"label": "a", "probabilities": {"a": 1.0}} for _ in range(n)]})

    client = GatewayClient("http://gw", transport=httpx.MockTransport(answer))
    assert len(client.classify_many("m", [str(i) for i in range(9)], 16)) == 9
    assert sizes == [9, 8, 4, 2, 2, 2, 2, 1]
    with pytest.raises(GatewayError, match="over the batch limit 3") as info:
        client.classify("m", ["x"] * 5)
    assert info.value.code == "batch_too_large" and info.value.status == 400


def test_adapter_examples_come_from_the_chosen_cards():
    cards = [{"id": "base"}, {"id": "a", "examples": ["x", "y"]},
             {"id": "b", "examples": ["y", "z"]}, {"id": "c", "examples": ["w"]}]
    assert feedback.adapter_examples(cards, ["a", "b"]) == ["x", "y", "z"]
    assert feedback.adapter_examples(cards, ["base"]) == []
    assert feedback.adapter_examples(cards, ["a", "b", "c"], n=2) == ["x", "y"]
