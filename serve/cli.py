"""`lorastack serve`: the gateway and its vLLM child. Imports nothing heavy until it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve_command(
    base: Annotated[str | None, typer.Option(help="Base model: alias, hub id or directory "
                                             "(env LORASTACK_BASE; default smollm2-135m)")] = None,
    store: Annotated[Path | None, typer.Option(help="Adapter store directory "
                                               "(env LORASTACK_STORE)")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1); "
                                             "beyond loopback, keys are required")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (default 8000; 0: any free "
                                             "port, printed once bound)")] = None,
    upstream: Annotated[list[str] | None, typer.Option(
        help="URL of a vLLM server already running (repeatable); no child is started")] = None,
    api_key: Annotated[list[str] | None, typer.Option(
        help="API key for /v1 routes (repeatable; env LORASTACK_API_KEYS)")] = None,
    admin_key: Annotated[str | None, typer.Option(
        help="Key for /v1/adapters/load and /unload (env LORASTACK_ADMIN_KEY)")] = None,
    capacity: Annotated[int | None, typer.Option(
        help="Adapters kept loaded; beyond, least recently used are evicted (default 8)")] = None,
    max_loras: Annotated[int | None, typer.Option(
        help="Adapters in one vLLM batch (default 4)")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="Largest rank served (16)")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="vLLM context length (1024)")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option(help="Prompt limit (768)")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Completion limit (512)")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Prompts per request (32)")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Body size limit (1000000)")] = None,
    start_timeout: Annotated[float | None, typer.Option(
        help="Seconds to wait for vLLM to become healthy (600)")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="Where adapter snapshots and the vLLM log go (default: a temporary dir)")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the base model and every adapter in the store behind an OpenAI-compatible API
    (plus /v1/classify), hot-swapping adapters as they are written."""
    from pydantic import ValidationError

    from lorastack.serve.settings import ServeSettings, SettingsError

    given = {"base": base, "store": store, "host": host, "port": port, "upstream": upstream,
             "api_keys": api_key, "admin_key": admin_key, "capacity": capacity,
             "max_loras": max_loras, "max_lora_rank": max_lora_rank,
             "max_model_len": max_model_len, "max_prompt_tokens": max_prompt_tokens,
             "max_tokens": max_tokens, "max_batch": max_batch, "max_body_bytes": max_body_bytes,
             "start_timeout_s": start_timeout, "work_dir": work_dir}
    try:
        settings = ServeSettings(**{k: v for k, v in given.items() if v not in (None, "", [])})
        settings.check_exposure()
    except (ValidationError, SettingsError) as exc:
        typer.echo(f"lorastack serve: {exc}", err=True)
        raise typer.Exit(2) from None
    run(settings, log_level)


def run(settings, log_level: str = "info") -> None:
    import logging

    import uvicorn

    from lorastack.serve.app import create_app
    from lorastack.serve.vllm_proc import VllmStartError

    logging.basicConfig(level=logging.INFO, format="lorastack serve: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per vLLM call is noise
    app = create_app(settings)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level,
                    timeout_graceful_shutdown=30)
    except VllmStartError as exc:
        typer.echo(f"lorastack serve: {exc}", err=True)
        raise typer.Exit(1) from None
