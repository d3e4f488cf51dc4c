"""The page's logic without a server: CSV reading, flagging, tables (and the column order the page
shows), the page's error hints, and the page building against a dead gateway. The client itself
(lorastack.client) is tested in tests/test_client.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lorastack.client import Adapters, Classified, Client, GatewayError, Member, ModelCard
from lorastack.demo import answers, feedback, inputs, models
from lorastack.demo.inputs import InputError


def _csv(tmp_path, text: str, name="reviews.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def test_csv_with_comma_quotes_and_bom(tmp_path):
    path = _csv(tmp_path, '\ufeffid,Review,stars\n1,"Great, works",5\n2,"Bad ""really""",1\n')
    frame = feedback.read_csv(path)
    assert list(frame.columns) == ["id", "Review", "stars"]
    assert feedback.guess_text_column(frame) == "Review"
    assert feedback.labelled_from_csv(frame, "Review")[0] == ["Great, works", 'Bad "really"']


def test_csv_semicolon_and_guess_by_length(tmp_path):
    frame = feedback.read_csv(_csv(tmp_path, "n;what people said\n1;It helped me a lot\n"
                                             "2;It did nothing for my headaches\n"))
    assert list(frame.columns) == ["n", "what people said"]
    assert feedback.guess_text_column(frame) == "what people said"


def test_csv_errors_are_readable(tmp_path):
    with pytest.raises(InputError, match="empty"):
        feedback.read_csv(_csv(tmp_path, "  \n"))
    with pytest.raises(InputError, match="no rows"):
        feedback.read_csv(_csv(tmp_path, "text,stars\n", "header.csv"))
    frame = feedback.read_csv(_csv(tmp_path, "text,stars\n  ,1\n,2\n", "blank.csv"))
    with pytest.raises(InputError, match="no column 'review'.*text"):
        feedback.labelled_from_csv(frame, "review")
    with pytest.raises(InputError, match="no text to classify"):
        feedback.labelled_from_csv(frame, "text")


def test_pasted_lines_skip_blanks_and_cap_the_size():
    assert feedback.texts_from_lines("a\n\n  b  \n\n") == ["a", "b"]
    with pytest.raises(InputError, match="no text"):
        feedback.texts_from_lines("\n \n")
    with pytest.raises(InputError, match="more than this page handles"):
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
    # what a reader came for first, the (long) text after, the row number last
    assert list(table.columns) == ["label", "confidence", "check", "p(positive)",
                                   "p(negative)", "text", "row"]
    assert table["row"].tolist() == [1, 2, 3] and table["text"].tolist() == ["a", "b", "c"]
    assert table["check"].tolist() == [False, True, False]
    assert table["confidence"].tolist() == [0.9, 0.55, 0.7]
    dist = feedback.label_distribution(table, ["positive", "negative", "neutral"])
    assert dist.to_dict("list") == {"label": ["positive", "negative", "neutral"],
                                    "count": [2, 1, 0]}
    text = feedback.summary(table, "m")
    assert "3 texts" in text and "**positive** 2 (67%)" in text and "1 least confident" in text
    path = feedback.write_results(table, tmp_path)
    assert path.read_text().splitlines()[0] == "label,confidence,check,p(positive)," \
                                                "p(negative),text,row"
    assert len(path.read_text().splitlines()) == 4
    with pytest.raises(ValueError, match="2 texts but 3 answers"):
        feedback.results_table(["a", "b"], _answers(), ["positive"])


def test_results_table_flags_rows_below_a_confidence():
    table = feedback.results_table(["a", "b", "c"], _answers(), ["positive", "negative"], 0.0,
                                   flag_below=0.75)
    assert table["check"].tolist() == [False, True, True]  # 0.55 and 0.7 are below 75%
    assert "2 least confident or below 75% sure flagged" in feedback.summary(table, "m")


def test_results_table_with_true_labels_says_which_are_wrong():
    table = feedback.results_table(["a", "b", "c"], _answers(), ["positive", "negative"], 0.3,
                                   truth=["Positive", "positive", ""])
    assert list(table.columns) == ["label", "true_label", "wrong", "confidence", "check",
                                   "p(positive)", "p(negative)", "text", "row"]
    assert table["wrong"].tolist() == [False, True, False]  # any case; no true label: not wrong
    assert "accuracy **50%** (1 of 2), 1 wrong (column `wrong`)" in feedback.summary(table, "m")
    with pytest.raises(ValueError, match="3 texts but 1 true labels"):
        feedback.results_table(["a", "b", "c"], _answers(), ["positive"], truth=["x"])


def test_labelled_csv_keeps_texts_and_true_labels_aligned(tmp_path):
    frame = feedback.read_csv(_csv(tmp_path, "review,Sentiment\nGood, positive\n ,negative\n"
                                             "Bad,negative\n"))
    assert feedback.guess_label_column(frame, "review") == "Sentiment"
    assert feedback.guess_label_column(frame, "Sentiment") is None
    assert feedback.labelled_from_csv(frame, "review", "Sentiment") == (
        ["Good", "Bad"], ["positive", "negative"])
    assert feedback.labelled_from_csv(frame, "review") == (["Good", "Bad"], None)
    with pytest.raises(InputError, match="no column 'gold'"):
        feedback.labelled_from_csv(frame, "review", "gold")


LABELS2 = ["positive", "negative"]
CARDS = {"object": "list", "data": [
    {"id": "base", "task": "generation", "parent": None},
    {"id": "c", "task": "classification", "parent": "base", "labels": LABELS2}]}


def _fake_gateway(request: httpx.Request) -> httpx.Response:
    """GET /v1/models, /v1/adapters and POST /v1/classify: "bad" in a text makes it negative."""
    if request.url.path == "/v1/models":
        return httpx.Response(200, json=CARDS)
    if request.url.path == "/v1/adapters":
        return httpx.Response(200, json={"data": [], "unloaded": [], "refused": {}})
    texts = json.loads(request.content)["input"]
    data = [{"index": i, "label": "negative" if "bad" in t.lower() else "positive",
             "probabilities": {"negative": 0.8, "positive": 0.2} if "bad" in t.lower() else
             {"positive": 0.7, "negative": 0.3}} for i, t in enumerate(texts)]
    return httpx.Response(200, json={"model": "c", "labels": LABELS2, "data": data,
                                     "usage": {"prompt_tokens": 1, "total_tokens": 1}})


def _handler(page, name: str):
    return next(f.fn for f in page.fns.values() if f.name == name)


def test_the_feedback_tables_the_page_shows_put_label_and_confidence_first(tmp_path):
    """What the page hands its two tables (least confident, every row), in the order shown:
    label and confidence in view on a normal screen, the long text after them, row last."""
    from lorastack.demo.app import build_page
    from lorastack.demo.feedback import NO_TRUTH

    page = build_page(Client("http://gw", transport=httpx.MockTransport(_fake_gateway)))
    classify_all = _handler(page, "classify_all")
    summary, _, csv_path, flagged, table = classify_all(
        None, None, None, "Works well\nBad for me\nFine", ["c"], 34, 0, 16)
    shown = ["label", "confidence", "check", "p(positive)", "p(negative)", "text", "row"]
    assert list(table.columns) == shown and list(flagged.columns) == shown
    assert table["label"].tolist() == ["positive", "negative", "positive"]
    assert sorted(flagged["row"]) == [1, 3]  # the two least confident
    assert Path(csv_path).read_text().splitlines()[0] == ",".join(shown)
    # "below N% sure": every row under the confidence is flagged, whatever the share
    summary, _, _, flagged, _ = classify_all(None, None, None, "Works well\nBad for me\nFine",
                                             ["c"], 0, 100, 16)
    assert sorted(flagged["row"]) == [1, 2, 3] and "below 100% sure" in summary
    # a CSV with true labels: the true-label column is guessed, then shown beside the label
    src = _csv(tmp_path, "id,review,label\n1,Works well,positive\n2,Bad for me,positive\n")
    column, truth = _handler(page, "pick_column")(str(src))
    assert (column["value"], truth["value"]) == ("review", "label")
    assert truth["choices"][0] == NO_TRUTH
    summary, _, _, flagged, table = classify_all(str(src), "review", "label", "", ["c"], 10, 0, 16)
    assert list(table.columns)[:5] == ["label", "true_label", "wrong", "confidence", "check"]
    assert list(table.columns)[-2:] == ["text", "row"] and list(flagged.columns) == list(
        table.columns)
    assert table["wrong"].tolist() == [False, True] and "accuracy **50%**" in summary
    _, _, _, _, table = classify_all(str(src), "review", NO_TRUTH, "", ["c"], 10, 0, 16)
    assert "true_label" not in table


def test_models_table_reads_cards_and_load_state():
    cards = [ModelCard.from_json(c) for c in (
        {"id": "base", "task": "generation", "parent": None, "created": 0},
        {"id": "s", "task": "classification", "parent": "base", "labels": ["a", "b"],
         "metrics": {"validation": {"accuracy": 0.75, "n": 8.0}, "test": {"f1": 1}},
         "created": 1_700_000_000},
        {"id": "g", "task": "generation", "parent": "base", "created": 1_700_000_000})]
    status = Adapters.from_json({"data": [{"name": "s", "loaded_on": ["http://x"],
                                           "inflight": 2}], "unloaded": ["g", "h"]})
    rows = models.models_table(cards, status).to_dict("records")
    assert rows[0]["state"] == "base model" and rows[0]["created"] == ""
    assert rows[1]["labels"] == "a, b" and rows[1]["validation"] == "accuracy 0.750, n 8"
    assert rows[1]["test"] == "f1 1" and list(rows[0])[:2] == ["name", "state"]
    assert rows[1]["state"].startswith("loaded (1 engine") and "2 in flight" in rows[1]["state"]
    assert rows[1]["created"] == "2023-11-14 22:13 UTC"
    assert rows[2]["state"] == "unloaded by hand"
    assert rows[3]["name"] == "h" and rows[3]["state"] == "unloaded by hand" and len(rows) == 4
    assert models.models_table(cards)["state"].tolist() == ["base model", "served (lazy)",
                                                             "served (lazy)"]


def test_the_pages_errors_name_the_pages_flags():
    from lorastack.demo.app import PAGE_HINTS, page_client

    body = b'{"error": {"message": "missing API key", "code": "missing_api_key"}}'
    assert str(GatewayError.from_response(401, body, PAGE_HINTS)) == (
        "gateway error 401: missing API key (give the page an API key: `lorastack demo "
        "--api-key KEY`)")
    assert "--admin-key" in str(GatewayError.from_response(403, b"{}", PAGE_HINTS))
    assert str(GatewayError.from_response(404, '{"error": {"message": "not served"}}',
                                          PAGE_HINTS)) == "gateway error 404: not served"
    client = page_client("http://gw/", "k", "a")
    assert (client.url, client.api_key, client.admin_key, client.hints) == (
        "http://gw", "k", "a", PAGE_HINTS)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_page_helpers():
    cards = [ModelCard("base", "generation"), ModelCard("c", "classification", "base")]
    assert models.model_choices(cards) == (["c"], ["base", "c"])
    assert models.keep(["c", "gone"], ["c"], []) == ["c"]
    assert models.keep(["gone"], ["c"], ["c"]) == ["c"]
    assert models.keep("gone", ["base"], "base") == "base"
    with pytest.raises(InputError, match="pick a classification adapter"):
        inputs.chosen_models([])
    md = answers.prediction_markdown(["a", "b"], Classified(
        "pos", {"pos": 0.8, "neg": 0.2},
        {"a": Member("pos", {"pos": 0.9, "neg": 0.1}),
         "b": Member("neg", {"pos": 0.3, "neg": 0.7})}))
    assert "Predicted: **pos** (80.0%)" in md and "ensemble" in md and "`b`: neg (70.0%)" in md


def test_what_a_person_gives_is_checked_and_turned_into_requests(tmp_path):
    assert inputs.chosen_models("c") == ["c"] and inputs.chosen_models(("a", "b")) == ["a", "b"]
    assert inputs.required("  hi \n", "say something") == "hi"
    with pytest.raises(InputError, match="say something"):
        inputs.required(None, "say something")
    history = [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]},
               {"role": "assistant", "content": {"text": "c"}}, {"role": "user", "content": 1}]
    assert inputs.chat_messages(history) == [{"role": "user", "content": "ab"},
                                             {"role": "assistant", "content": "c"},
                                             {"role": "user", "content": "1"}]
    src = _csv(tmp_path, "review,label\nGood,positive\nBad,negative\n")
    assert feedback.reviews(None, None, None, "x\n\ny") == (["x", "y"], None)
    assert feedback.reviews(str(src), "review", "label", "ignored") == (
        ["Good", "Bad"], ["positive", "negative"])
    assert feedback.reviews(str(src), "review", feedback.NO_TRUTH, "") == (["Good", "Bad"], None)


def test_model_dropdowns_start_and_refresh_by_one_rule():
    def values(*args):
        return [value for _, value in models.model_dropdowns(*args)]

    assert values(["c", "d"], ["base", "c", "d"]) == [["c"], ["c"], "base", "base", "c"]
    assert values([], ["base"]) == [[], [], "base", "base", "base"]
    assert values([], []) == [[], [], None, None, None]
    kept = models.model_dropdowns(["c", "d"], ["base", "c", "d"],
                                  [["c", "gone"], ["gone"], "gone", "d", None])
    assert [value for _, value in kept] == [["c"], ["c"], "base", "d", "c"]
    assert [choices for choices, _ in kept] == [["c", "d"]] * 2 + [["base", "c", "d"]] * 3
    assert models.refused_markdown({}) == ""
    assert models.refused_markdown({"x": "rank 999 is over 64"}) == (
        "**Refused by the gateway:**\n- `x`: rank 999 is over 64")


def test_a_compare_side_without_labels_or_served_model_says_so():
    def gateway(request: httpx.Request) -> httpx.Response:
        if b'"gone"' in request.content:
            return httpx.Response(404, json={"error": {"message": "model 'gone' is not served"}})
        return _fake_gateway(request)

    client = Client("http://gw", transport=httpx.MockTransport(gateway))
    assert answers.classify_side(client, "c", "fine", ["c"]) == (
        {"positive": 0.7, "negative": 0.3}, "c: positive (70.0%)")
    probs, text = answers.classify_side(client, "base", "x", ["c"])
    assert probs is None and text.startswith("base is not a classification adapter")
    assert text.endswith("Pick one of: c")
    assert answers.classify_side(client, "gone", "x", ["c", "gone"]) == (
        None, "gone: gateway error 404: model 'gone' is not served")


def test_handlers_turn_gateway_errors_into_gradio_errors():
    import gradio as gr

    from lorastack.demo.tabs import shown

    @shown
    def plain():
        raise GatewayError("<model> 'x' is not served here", 404)

    @shown
    def streaming():
        yield 1
        raise InputError("type a text")

    with pytest.raises(gr.Error) as info:
        plain()
    assert info.value.message == "gateway error 404: &lt;model&gt; 'x' is not served here"
    gen = streaming()
    assert next(gen) == 1
    with pytest.raises(gr.Error, match="type a text"):
        next(gen)


def test_page_builds_against_a_dead_gateway_and_says_so():
    from lorastack.demo.app import build_page

    page = build_page(Client(f"http://127.0.0.1:{_closed_port()}", api_key=""))
    status = next(b for b in page.blocks.values() if getattr(b, "elem_id", None) == "status")
    assert "cannot reach the gateway" in status.value
    tabs = [b.label for b in page.blocks.values() if type(b).__name__ == "Tab"]
    assert tabs == ["Classify", "Feedback analysis", "Generate", "Compare", "Adapters"]


def test_demo_command_is_registered_without_importing_gradio():
    code = ("import sys, lorastack.commands; "
            "print(','.join(m for m in ('gradio', 'httpx', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    helped = subprocess.run([sys.executable, "-m", "lorastack", "demo", "--help"],
                            capture_output=True, text=True, check=True)
    for flag in ("--server", "--api-key", "--admin-key", "--port", "--host"):
        assert flag in helped.stdout


def test_adapter_examples_come_from_the_chosen_cards():
    cards = [ModelCard.from_json(c) for c in (
        {"id": "base"}, {"id": "a", "examples": ["x", "y", {"text": "r", "drug": "d"}]},
        {"id": "b", "examples": ["y", "z"]}, {"id": "c", "examples": ["w"]})]
    assert models.adapter_examples(cards, ["a", "b"]) == ["x", "y", "z"]
    assert models.adapter_examples(cards, ["base"]) == []
    assert models.adapter_examples(cards, ["a", "b", "c"], n=2) == ["x", "y"]


def test_screenshots_reach_the_tracked_figures_only_when_asked(tmp_path, monkeypatch):
    from demo_helpers import FIGURES, OUTPUT, REPO, UPDATE_FIGURES, save_figure

    if (REPO / ".git").exists():  # screenshots go where git does not look
        ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q",
                                  str(OUTPUT / "demo-classify.png")], check=False)
        assert ignored.returncode == 0, f"{OUTPUT} is not ignored by git"
    assert FIGURES == REPO / "docs" / "figures"
    shot = tmp_path / "shot.png"
    shot.write_bytes(b"png")
    figures = tmp_path / "figures"
    monkeypatch.delenv(UPDATE_FIGURES, raising=False)
    assert save_figure(shot, "demo-classify.png", figures) is None and not figures.exists()
    monkeypatch.setenv(UPDATE_FIGURES, "1")
    assert save_figure(shot, "demo-classify.png", figures).read_bytes() == b"png"
