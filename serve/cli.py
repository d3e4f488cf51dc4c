"""`lorastack serve`: the gateway and its vLLM child. Imports nothing heavy until it runs.

Its flags are ServeSettings' fields (serve/settings.py), one declaration: each field is a flag
named after it (`max_loras` -> `--max-loras`), with the field's docstring as its help; lists
are repeatable flags and booleans take `--x/--no-x`. A flag that is given wins over the
field's LORASTACK_* environment variable.
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any

import typer

# the flags whose names differ from their field's (as documented since the first release)
FLAGS = {"api_keys": "--api-key", "start_timeout_s": "--start-timeout"}
METAVARS = {int: "INT", float: "FLOAT", Path: "PATH", list[str]: "TEXT (repeatable)"}


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _cli_type(annotation: Any) -> type:
    """The type typer parses a field's flag as (pydantic validates the value afterwards)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _cli_type(args[0])
    if origin is list:
        return list[str]
    if origin is typing.Literal:
        return str
    if args and origin is not None:  # X | None
        return _cli_type(args[0])
    return annotation if annotation in (str, int, float, bool, Path) else str


def _parameters() -> list[inspect.Parameter]:
    from lorastack.serve.settings import ServeSettings

    params = []
    for name, field in ServeSettings.model_fields.items():
        kind = _cli_type(field.annotation)
        default = field.default if field.default not in (None, [], "") else None
        help_text = f"{field.description or ''} (env LORASTACK_{name.upper()}" + (
            f"; default {default})" if default is not None else ")")
        flag = _flag(name)
        if kind is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        option = typer.Option(flag, help=help_text, show_default=False,
                              metavar=None if kind is bool else METAVARS.get(kind, "TEXT"))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    params.append(inspect.Parameter("log_level", inspect.Parameter.KEYWORD_ONLY, default="info",
                                    annotation=Annotated[str, typer.Option(
                                        help="uvicorn log level")]))
    return params


def serve_command(**given: Any) -> None:
    """Serve the base model and every adapter in the store behind an OpenAI-compatible API
    (plus /v1/classify), hot-swapping adapters as they are written."""
    from pydantic import ValidationError

    from lorastack.adapters.validation import explain_errors
    from lorastack.serve.settings import ServeSettings, SettingsError

    log_level = given.pop("log_level", "info")
    try:
        settings = ServeSettings(**{k: v for k, v in given.items()
                                    if v is not None and v != [] and v != ""})
        settings.check_exposure()
    except (ValidationError, SettingsError) as exc:
        why = explain_errors(exc.errors(), ServeSettings) if isinstance(exc, ValidationError) \
            else str(exc)
        typer.echo(f"lorastack serve: {why}", err=True)
        raise typer.Exit(2) from None
    run(settings, log_level)


_signature = inspect.Signature(_parameters())
serve_command.__signature__ = _signature  # type: ignore[attr-defined]
serve_command.__annotations__ = {p.name: p.annotation for p in _signature.parameters.values()}


def run(settings, log_level: str = "info") -> None:
    import logging

    import uvicorn

    from lorastack.serve.app import create_app
    from lorastack.serve.vllm_proc import StartError

    logging.basicConfig(level=logging.INFO, format="lorastack serve: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per vLLM call is noise
    if settings.backend == "ray":
        from lorastack.serve import ray_app

        ray_app.run(settings)
        return
    app = create_app(settings)
    # held from the start: see listening_socket
    sock = _bind(settings.host, settings.port)
    config = uvicorn.Config(app, host=settings.host, port=sock.getsockname()[1],
                            log_level=log_level, timeout_graceful_shutdown=30)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except StartError as exc:
        typer.echo(f"lorastack serve: {exc}", err=True)
        raise typer.Exit(1) from None


def _bind(host: str, port: int):
    """The gateway's listening socket, or a one-line error and exit 1."""
    from lorastack.serve.vllm_proc import listening_socket

    try:
        return listening_socket(host, port)
    except OSError as exc:
        typer.echo(f"lorastack serve: cannot listen on {host}:{port}: {exc.strerror}; "
                   "stop what uses it or choose another --port (0: any free port)", err=True)
        raise typer.Exit(1) from None
