"""The Gradio page: build_page(client) -> gr.Blocks, five tabs (demo/tabs.py) over the gateway's
HTTP API. Model lists refresh on a timer, so an adapter written to the server's store shows up
without reloading the page. Failures show as the client's readable message, never a traceback."""

from __future__ import annotations

import gradio as gr

from lorastack.client import HINTS, Client, GatewayError
from lorastack.demo import models, tabs

REFRESH_S = 5.0
# The page's advice after a gateway error, by status: its own flags where the client's hints
# name the client's arguments.
PAGE_HINTS = {**HINTS, 401: "give the page an API key: `lorastack demo --api-key KEY`",
              403: "load/unload needs the admin key: `lorastack demo --admin-key KEY`"}


def page_client(server: str, api_key: str | None = None, admin_key: str | None = None
                ) -> Client:
    """The page's client of the gateway: lorastack.client with the page's hints."""
    return Client(server, api_key=api_key, admin_key=admin_key, hints=PAGE_HINTS)


def build_page(client: Client) -> gr.Blocks:
    """The five tabs, the status line, the model lists they share and the timer refreshing them."""
    try:
        cards, status_line = client.models(), ""
    except GatewayError as exc:
        cards, status_line = [], f"⚠ {exc}"
    classifiers, every = models.model_choices(cards)
    first = [value for _, value in models.model_dropdowns(classifiers, every)]

    with gr.Blocks(title="lorastack") as page:
        gr.Markdown(f"# lorastack\nServing at `{client.url}`: classify, analyse feedback, "
                    f"generate and compare with the adapters it serves.")
        status = gr.Markdown(status_line, elem_id="status")
        names = gr.State((classifiers, every))
        timer = gr.Timer(REFRESH_S)
        dropdowns = [tabs.classify_tab(client, cards, classifiers, first[0]),
                     tabs.feedback_tab(client, classifiers, first[1])]
        gen_model, sampling = tabs.generate_tab(client, every, first[2])
        dropdowns += [gen_model, *tabs.compare_tab(client, every, first[3:], sampling, names)]
        table, refused, listeners = tabs.adapters_tab(client, cards)

        def refresh(known, *chosen):
            """Timer tick: new model lists (only when they changed) and the adapters table."""
            try:
                cards, state = client.models(), client.adapters()
            except GatewayError as exc:
                return f"⚠ {exc}", known, *[gr.skip()] * (len(dropdowns) + 2)
            lists = models.model_choices(cards)
            updates = ([gr.skip()] * len(dropdowns) if lists == tuple(known) else
                       [gr.update(choices=c, value=v) for c, v in models.model_dropdowns(*lists, chosen)])
            return ("", lists, *updates, models.models_table(cards, state),
                    models.refused_markdown(state.refused))

        for listen in (timer.tick, *listeners):
            listen(refresh, [names, *dropdowns], [status, names, *dropdowns, table, refused],
                   show_progress="hidden")
    return page
