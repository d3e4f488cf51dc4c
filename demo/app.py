"""The Gradio page: build_page(client) -> gr.Blocks, five tabs over the gateway's HTTP API.

Classify (one text, label probabilities), Feedback analysis (a pile of reviews: distribution,
sortable table, least confident rows, CSV download), Generate (streamed), Compare (two models
side by side) and Adapters (model cards, load/unload). Model lists refresh on a timer, so an
adapter written to the server's store shows up without reloading the page. Every failure is
shown as the client's readable message (gr.Error), never as a stack trace.
"""

from __future__ import annotations

import functools
import html
import inspect
import queue
import threading

import gradio as gr

from lorastack.client import Classified, Client, GatewayError, ModelCard
from lorastack.demo import feedback

REFRESH_S = 5.0
# The page's advice after a gateway error, by status: its own flags (lorastack.client's default
# hints name the client's arguments).
PAGE_HINTS = {401: "give the page an API key: `lorastack demo --api-key KEY`",
              403: "load/unload needs the admin key: `lorastack demo --admin-key KEY`",
              503: "the model server is starting or restarting; retry in a moment"}
NO_TRUTH = "(none)"  # the true-label column's choice for a file without true labels
# Offered beside the chosen adapter's own validation examples (its model card's `examples`),
# so that there is something to click for any adapter, even one whose card lists none.
EXAMPLES = [
    "This medicine works great, my pain is gone and I had no side effects at all.",
    "Terrible side effects: it made me sick for a week and did not help.",
    "It is okay I guess. Some days are better than others.",
    "After two months my skin cleared up completely. I would recommend it.",
    "I gained weight and felt exhausted all the time, so I stopped taking it.",
]


def page_client(server: str, api_key: str | None = None, admin_key: str | None = None
                ) -> Client:
    """The page's client of the gateway: lorastack.client with the page's hints."""
    return Client(server, api_key=api_key, admin_key=admin_key, hints=PAGE_HINTS)


def shown(fn):
    """Run a handler; a GatewayError or InputError becomes a readable gr.Error on the page."""
    def fail(exc: Exception):
        return gr.Error(html.escape(str(exc), quote=False), duration=None, print_exception=False)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (GatewayError, feedback.InputError) as exc:
                raise fail(exc) from None
        return gen

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (GatewayError, feedback.InputError) as exc:
            raise fail(exc) from None
    return plain


def model_choices(cards: list[ModelCard]) -> tuple[list[str], list[str]]:
    """(classification adapters, every model) from GET /v1/models; the base model first."""
    every = [c.id for c in cards]
    return [c.id for c in cards if c.task == "classification"], every


def keep(value, choices: list[str], default):
    """A dropdown's value after its choices changed: what still exists, else the default."""
    if isinstance(value, list):
        kept = [v for v in value if v in choices]
        return kept or default
    return value if value in choices else default


def as_models(value) -> list[str]:
    models = [value] if isinstance(value, str) else list(value or [])
    if not models:
        raise feedback.InputError("pick a classification adapter first (several make an "
                                  "ensemble: their probabilities are averaged)")
    return models


def prediction_markdown(models: list[str], answer: Classified) -> str:
    lines = [f"### Predicted: **{answer.label}** ({answer.confidence:.1%})",
             f"by `{' + '.join(models)}`" + (" (ensemble: the members' mean)"
                                              if len(models) > 1 else "")]
    for name, member in (answer.members or {}).items():
        lines.append(f"- `{name}`: {member.label} ({member.confidence:.1%})")
    return "\n\n".join(lines[:2]) + ("\n\n" + "\n".join(lines[2:]) if lines[2:] else "")


def build_page(client: Client) -> gr.Blocks:
    try:
        cards, status_line = client.models(), ""
    except GatewayError as exc:
        cards, status_line = [], f"⚠ {exc}"
    classifiers, every = model_choices(cards)
    first_cls = classifiers[:1]
    base = every[0] if every else None

    with gr.Blocks(title="lorastack") as page:
        gr.Markdown(f"# lorastack\nServing at `{client.url}`: classify, analyse feedback, "
                    f"generate and compare with the adapters it serves.")
        status = gr.Markdown(status_line, elem_id="status")
        names = gr.State((classifiers, every))
        timer = gr.Timer(REFRESH_S)

        # -- Classify -------------------------------------------------------------------------
        with gr.Tab("Classify", id="classify"), gr.Row():
            with gr.Column(scale=3):
                cls_model = gr.Dropdown(classifiers, value=first_cls, multiselect=True,
                                        label="Classification adapter(s)",
                                        info="several with one label set make an ensemble",
                                        elem_id="cls_model")
                cls_text = gr.Textbox(label="Review", lines=5, elem_id="cls_text",
                                      placeholder="Type or paste a text")
                cls_btn = gr.Button("Classify", variant="primary", elem_id="cls_btn")
                first_examples = feedback.adapter_examples(cards, first_cls)
                val_examples = gr.Dataset(
                    components=[cls_text], samples=[[e] for e in first_examples],
                    label="From the adapter's validation data (one click)",
                    elem_id="cls_val_examples", visible=bool(first_examples))
                gr.Examples(EXAMPLES, inputs=cls_text, label="Examples (one click)")
            with gr.Column(scale=2):
                cls_pred = gr.Markdown(elem_id="cls_pred")
                cls_probs = gr.Label(label="Probability of each label", elem_id="cls_probs")

        @shown
        def classify_one(models, text):
            models = as_models(models)
            if not (text or "").strip():
                raise feedback.InputError("type or paste a text to classify")
            answer = client.classify(models, text.strip())[0]
            return answer.probabilities, prediction_markdown(models, answer)

        gr.on([cls_btn.click, cls_text.submit], classify_one, [cls_model, cls_text],
              [cls_probs, cls_pred])

        def show_examples(models):
            """The chosen adapters' validation examples (the gateway's model cards)."""
            try:
                found = feedback.adapter_examples(client.models(), as_models(models))
            except GatewayError:
                return gr.skip()
            return gr.Dataset(samples=[[e] for e in found], visible=bool(found))

        cls_model.change(show_examples, cls_model, val_examples, show_progress="hidden")
        val_examples.click(lambda sample: sample[0], val_examples, cls_text)

        # -- Feedback analysis ----------------------------------------------------------------
        with gr.Tab("Feedback analysis", id="feedback"):
            gr.Markdown("Upload a CSV of reviews (and pick the text column) or paste one review "
                        "per line; every row is classified, the least confident are flagged.")
            with gr.Row():
                with gr.Column():
                    fb_file = gr.File(label="CSV file", file_types=[".csv", ".tsv", ".txt"],
                                      elem_id="fb_file")
                    fb_column = gr.Dropdown([], label="Text column", elem_id="fb_column",
                                            interactive=True)
                    fb_truth = gr.Dropdown([], label="True-label column (optional)",
                                           info="adds `true_label`, `wrong` and the accuracy",
                                           elem_id="fb_truth", interactive=True)
                with gr.Column():
                    fb_lines = gr.Textbox(label="…or paste one review per line", lines=6,
                                          elem_id="fb_lines")
            with gr.Row():
                fb_model = gr.Dropdown(classifiers, value=first_cls, multiselect=True,
                                       label="Classification adapter(s)", elem_id="fb_model")
                fb_flag = gr.Slider(0, 50, value=10, step=1, label="Flag the least confident %")
                fb_batch = gr.Slider(1, 32, value=16, step=1, label="Texts per request")
            fb_btn = gr.Button("Classify all", variant="primary", elem_id="fb_btn")
            fb_summary = gr.Markdown(elem_id="fb_summary")
            with gr.Row():
                fb_chart = gr.BarPlot(x="label", y="count", title="Label distribution",
                                      elem_id="fb_chart")
                fb_download = gr.File(label="Results (CSV)", elem_id="fb_download",
                                      interactive=False)
            fb_flagged = gr.Dataframe(label="Least confident: worth a human look",
                                      interactive=False, elem_id="fb_flagged", wrap=True)
            fb_table = gr.Dataframe(label="Every row (click a header to sort)",
                                    interactive=False, elem_id="fb_table", wrap=True,
                                    show_search="search")

        @shown
        def pick_column(path):
            if not path:
                return gr.update(choices=[], value=None), gr.update(choices=[], value=None)
            frame = feedback.read_csv(path)
            columns = [str(c) for c in frame.columns]
            text = feedback.guess_text_column(frame)
            truth = feedback.guess_label_column(frame, text) or NO_TRUTH
            return (gr.update(choices=columns, value=text),
                    gr.update(choices=[NO_TRUTH, *columns], value=truth))

        @shown
        def classify_all(path, column, truth_column, pasted, models, flag_pct, batch,
                         progress=gr.Progress()):  # noqa: B008  (Gradio's idiom)
            models = as_models(models)
            truth = None
            if path:
                texts, truth = feedback.labelled_from_csv(
                    feedback.read_csv(path), column or "",
                    None if truth_column in (None, "", NO_TRUTH) else truth_column)
            else:
                texts = feedback.texts_from_lines(pasted)
            progress((0, len(texts)), desc="classifying", unit="texts")
            results = client.classify_many(
                models, texts, int(batch),
                on_batch=lambda done, total: progress((done, total), desc="classifying",
                                                      unit="texts"))
            labels = list(results.labels or results[0].probabilities)
            table = feedback.results_table(texts, results, labels, flag_pct / 100, truth)
            return (feedback.summary(table, " + ".join(models)),
                    feedback.label_distribution(table, labels),
                    str(feedback.write_results(table)),
                    table[table["check"]].sort_values("confidence"), table)

        fb_file.change(pick_column, fb_file, [fb_column, fb_truth])
        fb_btn.click(classify_all,
                     [fb_file, fb_column, fb_truth, fb_lines, fb_model, fb_flag, fb_batch],
                     [fb_summary, fb_chart, fb_download, fb_flagged, fb_table])

        # -- Generate -------------------------------------------------------------------------
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                gen_model = gr.Dropdown(every, value=base, label="Model (base or adapter)",
                                        elem_id="gen_model")
                gen_mode = gr.Radio(["chat", "single prompt"], value="chat", label="Mode",
                                    elem_id="gen_mode")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, 512, value=96, step=1, label="Max tokens",
                                       elem_id="gen_max")
            gen_chat = gr.Chatbot(label="Chat", elem_id="gen_chat", height=320)
            gen_out = gr.Textbox(label="Completion", lines=8, visible=False, elem_id="gen_out")
            gen_in = gr.Textbox(label="Message", elem_id="gen_in", lines=2,
                                placeholder="Say something, press Enter or Generate")
            with gr.Row():
                gen_btn = gr.Button("Generate", variant="primary", elem_id="gen_btn")
                gen_clear = gr.Button("Clear")

        @shown
        def generate(model, mode, text, history, temp, p, limit):
            if not model:
                raise feedback.InputError("pick a model to generate with")
            if not (text or "").strip():
                raise feedback.InputError("type a message or a prompt first")
            params = {"temperature": temp, "top_p": p, "max_tokens": int(limit)}
            if mode == "chat":
                history = [*(history or []), {"role": "user", "content": text}]
                messages = [{"role": m["role"], "content": _text(m["content"])}
                            for m in history]
                reply = ""
                yield history + [{"role": "assistant", "content": "…"}], gr.skip(), ""
                try:
                    for piece in client.stream_chat(model, messages, **params):
                        reply += piece
                        yield history + [{"role": "assistant", "content": reply}], gr.skip(), ""
                except GatewayError:  # drop the failed turn and give the message back
                    yield history[:-1], gr.skip(), text
                    raise
            else:
                out = text
                yield gr.skip(), out, gr.skip()
                for piece in client.stream_complete(model, text, **params):
                    out += piece
                    yield gr.skip(), out, gr.skip()

        gen_mode.change(lambda m: (gr.update(visible=m == "chat"),
                                   gr.update(visible=m != "chat")), gen_mode, [gen_chat, gen_out])
        gr.on([gen_btn.click, gen_in.submit], generate,
              [gen_model, gen_mode, gen_in, gen_chat, temperature, top_p, max_tokens],
              [gen_chat, gen_out, gen_in])
        gen_clear.click(lambda: ([], ""), None, [gen_chat, gen_out])

        # -- Compare --------------------------------------------------------------------------
        with gr.Tab("Compare", id="compare"):
            cmp_task = gr.Radio(["classification", "generation"], value="classification",
                                label="Task", elem_id="cmp_task")
            cmp_text = gr.Textbox(label="Input", lines=3, elem_id="cmp_text")
            cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp_btn")
            with gr.Row():
                with gr.Column():
                    cmp_a = gr.Dropdown(every, value=base, label="Model A", elem_id="cmp_a")
                    cmp_label_a = gr.Label(label="A: probabilities", elem_id="cmp_label_a")
                    cmp_out_a = gr.Textbox(label="A: answer", lines=6, elem_id="cmp_out_a")
                with gr.Column():
                    cmp_b = gr.Dropdown(every, value=(classifiers or every or [None])[0],
                                        label="Model B", elem_id="cmp_b")
                    cmp_label_b = gr.Label(label="B: probabilities", elem_id="cmp_label_b")
                    cmp_out_b = gr.Textbox(label="B: answer", lines=6, elem_id="cmp_out_b")

        @shown
        def compare(task, text, a, b, temp, p, limit, known):
            if not (a and b):
                raise feedback.InputError("pick two models to compare")
            if not (text or "").strip():
                raise feedback.InputError("type an input to compare the two models on")
            if task == "classification":
                classifiers = known[0]
                yield (*_classify_side(client, a, text, classifiers),
                       *_classify_side(client, b, text, classifiers))
                return
            params = {"temperature": temp, "top_p": p, "max_tokens": int(limit)}
            for out_a, out_b in stream_pair(client, (a, b), text, params):
                yield None, out_a, None, out_b

        cmp_btn.click(compare, [cmp_task, cmp_text, cmp_a, cmp_b, temperature, top_p,
                                max_tokens, names],
                      [cmp_label_a, cmp_out_a, cmp_label_b, cmp_out_b])

        # -- Adapters -------------------------------------------------------------------------
        with gr.Tab("Adapters", id="adapters") as adapters_tab:
            ad_table = gr.Dataframe(feedback.models_table(cards), label="Served models "
                                    "(GET /v1/models)", interactive=False, elem_id="ad_table",
                                    wrap=True)
            ad_refused = gr.Markdown(elem_id="ad_refused")
            refresh_btn = gr.Button("Refresh", size="sm")
            with gr.Row(visible=bool(client.admin_key)):
                ad_name = gr.Textbox(label="Adapter name (in the server's store)",
                                     elem_id="ad_name")
                ad_load = gr.Button("Load", elem_id="ad_load")
                ad_unload = gr.Button("Unload", elem_id="ad_unload")
            ad_result = gr.Markdown(elem_id="ad_result")
            if not client.admin_key:
                gr.Markdown("Start the page with `--admin-key KEY` to load and unload adapters.")

        def refresh(known, a, b, c, d, e):
            """Timer tick: new model lists (only when they changed) and the adapters table."""
            try:
                cards = client.models()
                state = client.adapters()
            except GatewayError as exc:
                return (f"⚠ {exc}", known, *[gr.skip()] * 5, gr.skip(), gr.skip())
            cls, every = model_choices(cards)
            refused = state.refused
            refused_md = "\n".join(["**Refused by the gateway:**"] +
                                   [f"- `{n}`: {why}" for n, why in refused.items()]) \
                if refused else ""
            if (cls, every) == tuple(known):
                dropdowns = [gr.skip()] * 5
            else:
                dropdowns = [gr.update(choices=cls, value=keep(a, cls, cls[:1])),
                             gr.update(choices=cls, value=keep(b, cls, cls[:1])),
                             gr.update(choices=every, value=keep(c, every, every[:1] or None)),
                             gr.update(choices=every, value=keep(d, every, every[0])),
                             gr.update(choices=every, value=keep(e, every, every[-1]))]
            return ("", (cls, every), *dropdowns, feedback.models_table(cards, state),
                    refused_md)

        refresh_io = {"fn": refresh,
                      "inputs": [names, cls_model, fb_model, gen_model, cmp_a, cmp_b],
                      "outputs": [status, names, cls_model, fb_model, gen_model, cmp_a, cmp_b,
                                  ad_table, ad_refused],
                      "show_progress": "hidden"}
        timer.tick(**refresh_io)
        refresh_btn.click(**refresh_io)
        adapters_tab.select(**refresh_io)

        def admin(action):
            @shown
            def run(name):
                if not (name or "").strip():
                    raise feedback.InputError("type the name of an adapter in the store")
                answer = getattr(client, action)(name.strip())
                return f"`{name.strip()}`: {answer.status or action + 'ed'}"
            return run

        ad_load.click(admin("load"), ad_name, ad_result).then(**refresh_io)
        ad_unload.click(admin("unload"), ad_name, ad_result).then(**refresh_io)
    return page


def _classify_side(client: Client, model: str, text: str, classifiers: list[str]):
    """(label probabilities, text) for one side of Compare; a generation model has no labels."""
    if model not in classifiers:
        return None, (f"{model} is not a classification adapter: it has no labels to score. "
                      f"Pick one of: {', '.join(classifiers) or 'none served'}")
    try:
        answer = client.classify([model], text)[0]
    except GatewayError as exc:
        if exc.status in (400, 404):
            return None, f"{model}: {exc}"
        raise
    return answer.probabilities, f"{model}: {answer.label} ({answer.confidence:.1%})"


def stream_pair(client: Client, models: tuple[str, str], prompt: str, params: dict):
    """Two chat generations at once; yields (text A, text B) whenever either grows."""
    events: queue.Queue = queue.Queue()

    def pump(side: int, model: str):
        try:
            for piece in client.stream_chat(model, [{"role": "user", "content": prompt}],
                                            **params):
                events.put((side, piece))
        except GatewayError as exc:
            events.put((side, f"\n[{exc}]"))
        finally:
            events.put((side, None))

    for side, model in enumerate(models):
        threading.Thread(target=pump, args=(side, model), daemon=True).start()
    texts, running = ["", ""], 2
    while running:
        side, piece = events.get()
        if piece is None:
            running -= 1
            continue
        texts[side] += piece
        yield texts[0], texts[1]


def _text(content) -> str:
    """A Chatbot message's content as plain text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)
