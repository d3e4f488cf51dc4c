"""The page's five tabs, one builder each: the Gradio wiring (the logic they call: inputs,
feedback, models, answers). build_page composes them."""

from __future__ import annotations

import contextlib
import functools
import html
import inspect

import gradio as gr

from lorastack.client import Client, GatewayError, ModelCard
from lorastack.demo import answers, feedback
from lorastack.demo.inputs import InputError, chat_messages, chosen_models, required
from lorastack.demo.models import adapter_examples, models_table

# Offered beside the chosen adapter's own validation examples (its model card's `examples`),
# so that there is something to click for any adapter, even one whose card lists none.
EXAMPLES = [
    "This medicine works great, my pain is gone and I had no side effects at all.",
    "Terrible side effects: it made me sick for a week and did not help.",
    "It is okay I guess. Some days are better than others.",
    "After two months my skin cleared up completely. I would recommend it.",
    "I gained weight and felt exhausted all the time, so I stopped taking it.",
]


@contextlib.contextmanager
def readable():
    """A GatewayError or InputError raised inside becomes a readable gr.Error on the page."""
    try:
        yield
    except (GatewayError, InputError) as exc:
        raise gr.Error(html.escape(str(exc), quote=False), duration=None,
                       print_exception=False) from None


def shown(fn):
    """A handler (a plain function or a generator) whose failures are readable()."""
    if not inspect.isgeneratorfunction(fn):
        return readable()(fn)

    @functools.wraps(fn)
    def gen(*args, **kwargs):
        with readable():
            yield from fn(*args, **kwargs)
    return gen


def classify_tab(client: Client, cards: list[ModelCard], classifiers: list[str],
                 first: list[str]) -> gr.Dropdown:
    """Classify: one text, every label's probability and the prediction."""
    with gr.Tab("Classify", id="classify"), gr.Row():
        with gr.Column(scale=3):
            cls_model = gr.Dropdown(classifiers, value=first, multiselect=True,
                                    label="Classification adapter(s)",
                                    info="several with one label set make an ensemble",
                                    elem_id="cls_model")
            cls_text = gr.Textbox(label="Review", lines=5, elem_id="cls_text",
                                  placeholder="Type or paste a text")
            cls_btn = gr.Button("Classify", variant="primary", elem_id="cls_btn")
            first_examples = adapter_examples(cards, first)
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
        models = chosen_models(models)
        answer = client.classify(models, required(text, "type or paste a text to classify"))[0]
        return answer.probabilities, answers.prediction_markdown(models, answer)

    def show_examples(chosen):
        """The chosen adapters' validation examples (the gateway's model cards)."""
        try:  # none chosen: none shown
            found = adapter_examples(client.models(), list(chosen or []))
        except GatewayError:
            return gr.skip()
        return gr.Dataset(samples=[[e] for e in found], visible=bool(found))

    gr.on([cls_btn.click, cls_text.submit], classify_one, [cls_model, cls_text],
          [cls_probs, cls_pred])
    cls_model.change(show_examples, cls_model, val_examples, show_progress="hidden")
    val_examples.click(lambda sample: sample[0], val_examples, cls_text)
    return cls_model


def feedback_tab(client: Client, classifiers: list[str], first: list[str]) -> gr.Dropdown:
    """Feedback analysis: a pile of reviews classified; distribution, tables, CSV download."""
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
            fb_model = gr.Dropdown(classifiers, value=first, multiselect=True,
                                   label="Classification adapter(s)", elem_id="fb_model")
            fb_flag = gr.Slider(0, 50, value=10, step=1, label="Flag the least confident %")
            fb_below = gr.Slider(0, 100, value=0, step=5, elem_id="fb_below",
                                 label="Also flag every row below this % sure (0: off; "
                                       "calibrated adapters' probabilities mean what they say)")
            fb_batch = gr.Slider(1, 32, value=16, step=1, label="Texts per request")
        fb_btn = gr.Button("Classify all", variant="primary", elem_id="fb_btn")
        fb_summary = gr.Markdown(elem_id="fb_summary")
        with gr.Row():
            fb_chart = gr.BarPlot(x="label", y="count", title="Label distribution",
                                  elem_id="fb_chart")
            fb_download = gr.File(label="Results (CSV)", elem_id="fb_download", interactive=False)
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
        truth = feedback.guess_label_column(frame, text) or feedback.NO_TRUTH
        return (gr.update(choices=columns, value=text),
                gr.update(choices=[feedback.NO_TRUTH, *columns], value=truth))

    @shown
    def classify_all(path, column, truth_column, pasted, models, flag_pct, below_pct, batch,
                     progress=gr.Progress()):  # noqa: B008  (Gradio's idiom)
        models = chosen_models(models)
        texts, truth = feedback.reviews(path, column, truth_column, pasted)
        def step(done, total):
            progress((done, total), desc="classifying", unit="texts")

        step(0, len(texts))
        results = client.classify_many(models, texts, int(batch), on_batch=step)
        labels = list(results.labels or results[0].probabilities)
        table = feedback.results_table(texts, results, labels, flag_pct / 100, truth,
                                       flag_below=below_pct / 100 if below_pct else None)
        return (feedback.summary(table, " + ".join(models)),
                feedback.label_distribution(table, labels), str(feedback.write_results(table)),
                table[table["check"]].sort_values("confidence"), table)

    fb_file.change(pick_column, fb_file, [fb_column, fb_truth])
    fb_btn.click(classify_all,
                 [fb_file, fb_column, fb_truth, fb_lines, fb_model, fb_flag, fb_below,
                  fb_batch],
                 [fb_summary, fb_chart, fb_download, fb_flagged, fb_table])
    return fb_model


def generate_tab(client: Client, every: list[str], first: str | None
                 ) -> tuple[gr.Dropdown, list[gr.Slider]]:
    """Generate: chat or a single prompt, streamed; its model, and its sampling sliders."""
    with gr.Tab("Generate", id="generate"):
        with gr.Row():
            gen_model = gr.Dropdown(every, value=first, label="Model (base or adapter)",
                                    elem_id="gen_model")
            gen_mode = gr.Radio(["chat", "single prompt"], value="chat", label="Mode",
                                elem_id="gen_mode")
        with gr.Row():
            sampling = [gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature"),
                        gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p"),
                        gr.Slider(1, 512, value=96, step=1, label="Max tokens",
                                  elem_id="gen_max")]
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
            raise InputError("pick a model to generate with")
        required(text, "type a message or a prompt first")
        params = {"temperature": temp, "top_p": p, "max_tokens": int(limit)}
        if mode == "chat":
            history = [*(history or []), {"role": "user", "content": text}]
            reply = ""
            yield history + [{"role": "assistant", "content": "…"}], gr.skip(), ""
            try:
                for piece in client.stream_chat(model, chat_messages(history), **params):
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

    gen_mode.change(lambda m: (gr.update(visible=m == "chat"), gr.update(visible=m != "chat")),
                    gen_mode, [gen_chat, gen_out])
    gr.on([gen_btn.click, gen_in.submit], generate,
          [gen_model, gen_mode, gen_in, gen_chat, *sampling], [gen_chat, gen_out, gen_in])
    gen_clear.click(lambda: ([], ""), None, [gen_chat, gen_out])
    return gen_model, sampling


def compare_tab(client: Client, every: list[str], first: tuple, sampling: list[gr.Slider],
                names: gr.State) -> tuple[gr.Dropdown, gr.Dropdown]:
    """Compare: one input, two models side by side; `names`: (classifiers, every model)."""
    with gr.Tab("Compare", id="compare"):
        cmp_task = gr.Radio(["classification", "generation"], value="classification",
                            label="Task", elem_id="cmp_task")
        cmp_text = gr.Textbox(label="Input", lines=3, elem_id="cmp_text")
        cmp_btn = gr.Button("Compare", variant="primary", elem_id="cmp_btn")
        with gr.Row():
            with gr.Column():
                cmp_a = gr.Dropdown(every, value=first[0], label="Model A", elem_id="cmp_a")
                cmp_label_a = gr.Label(label="A: probabilities", elem_id="cmp_label_a")
                cmp_out_a = gr.Textbox(label="A: answer", lines=6, elem_id="cmp_out_a")
            with gr.Column():
                cmp_b = gr.Dropdown(every, value=first[1], label="Model B", elem_id="cmp_b")
                cmp_label_b = gr.Label(label="B: probabilities", elem_id="cmp_label_b")
                cmp_out_b = gr.Textbox(label="B: answer", lines=6, elem_id="cmp_out_b")

    @shown
    def compare(task, text, a, b, temp, p, limit, known):
        if not (a and b):
            raise InputError("pick two models to compare")
        required(text, "type an input to compare the two models on")
        if task == "classification":
            yield (*answers.classify_side(client, a, text, known[0]),
                   *answers.classify_side(client, b, text, known[0]))
            return
        params = {"temperature": temp, "top_p": p, "max_tokens": int(limit)}
        for out_a, out_b in answers.stream_pair(client, (a, b), text, params):
            yield None, out_a, None, out_b

    cmp_btn.click(compare, [cmp_task, cmp_text, cmp_a, cmp_b, *sampling, names],
                  [cmp_label_a, cmp_out_a, cmp_label_b, cmp_out_b])
    return cmp_a, cmp_b


def adapters_tab(client: Client, cards: list[ModelCard]) -> tuple:
    """Adapters: model cards, load state, load/unload; (table, refused, what refreshes them)."""
    with gr.Tab("Adapters", id="adapters") as tab:
        ad_table = gr.Dataframe(models_table(cards), label="Served models (GET /v1/models)",
                                interactive=False, elem_id="ad_table", wrap=True)
        ad_refused = gr.Markdown(elem_id="ad_refused")
        refresh_btn = gr.Button("Refresh", size="sm")
        with gr.Row(visible=bool(client.admin_key)):
            ad_name = gr.Textbox(label="Adapter name (in the server's store)", elem_id="ad_name")
            ad_load = gr.Button("Load", elem_id="ad_load")
            ad_unload = gr.Button("Unload", elem_id="ad_unload")
        ad_result = gr.Markdown(elem_id="ad_result")
        if not client.admin_key:
            gr.Markdown("Start the page with `--admin-key KEY` to load and unload adapters.")

    def admin(action):
        @shown
        def run(name):
            name = required(name, "type the name of an adapter in the store")
            return f"`{name}`: {getattr(client, action)(name).status or action + 'ed'}"
        return run

    done = [ad_load.click(admin("load"), ad_name, ad_result),
            ad_unload.click(admin("unload"), ad_name, ad_result)]
    return ad_table, ad_refused, [tab.select, refresh_btn.click, *(d.then for d in done)]
