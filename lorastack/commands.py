"""The `lorastack` command's verbs, composed from the ones each package defines in its own
cli.py (the command starts in lorastack/cli.py, which picks the allocator first).

Nothing heavy is imported here or in those modules at import time, so `lorastack --help`
answers instantly; torch and friends load inside the commands that need them.
"""

from __future__ import annotations

import typer

from lorastack import __version__
from lorastack.adapters.cli import adapters_app, models_app
from lorastack.demo.cli import demo_command
from lorastack.serve.cli import serve_command
from lorastack.train.cli import (
    calibrate_command,
    data_app,
    ensemble_command,
    eval_command,
    plan_command,
    train_command,
    tune_command,
)
from lorastack.train.export import export_command

app = typer.Typer(
    name="lorastack",
    help="Train LoRA/QLoRA adapters and serve them hot-swapped behind vLLM.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
app.command("train")(train_command)
app.command("tune")(tune_command)
app.command("eval")(eval_command)
app.command("calibrate", short_help="Fit a classification adapter's temperature (and label bias) on its "
            "validation split; the server applies it.")(calibrate_command)
app.command("ensemble", short_help="Fit an ensemble of classification adapters on validation; "
            "the gateway serves it under its name.")(ensemble_command)
app.command("export")(export_command)
app.command("plan")(plan_command)
app.command("serve", short_help="Serve the base model and every stored adapter behind an "
            "OpenAI-compatible API (plus /v1/classify).")(serve_command)
app.command("demo", short_help="Start the Gradio page for a running gateway (it talks to it over "
            "HTTP only).")(demo_command)


@app.command()
def version() -> None:
    """Print the lorastack version."""
    typer.echo(__version__)
