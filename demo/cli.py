"""`lorastack demo`: the Gradio page in front of a gateway. Imports gradio only when it runs."""

from __future__ import annotations

from typing import Annotated

import typer


def demo_command(
    server: Annotated[str, typer.Option(help="The gateway's URL (`lorastack serve`)",
                                        envvar="LORASTACK_SERVER")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(help="API key the gateway asks for",
                                                envvar="LORASTACK_API_KEY")] = None,
    admin_key: Annotated[str | None, typer.Option(
        help="Admin key: enables load/unload on the Adapters tab",
        envvar="LORASTACK_ADMIN_KEY")] = None,
    host: Annotated[str, typer.Option(help="Address the page binds; anything but loopback "
                                      "exposes it (and its keys) to the network")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port the page binds")] = 7860,
) -> None:
    """Start the Gradio page (classify, analyse feedback, generate, compare, manage adapters)
    for a running gateway; it talks to the gateway over HTTP only."""
    from lorastack.client import GatewayError
    from lorastack.demo.app import build_page, page_client

    client = page_client(server, api_key=api_key, admin_key=admin_key)
    try:  # start anyway: the page says so, and recovers when the gateway is up
        health = client.health()
        if not health.ok:
            reasons = "; ".join(e.reason for e in health.engines if e.reason) or health.status
            typer.echo(f"lorastack demo: warning: the gateway at {server} has no model server "
                       f"up yet ({reasons})", err=True)
    except GatewayError as exc:
        typer.echo(f"lorastack demo: warning: {exc}", err=True)
    page = build_page(client)
    typer.echo(f"lorastack demo: page for {server} at http://{host}:{port}")
    page.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port,
                                                   show_error=False)
