"""CLI verbs of lorastack.adapters: `lorastack models ...` and `lorastack adapters ...`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from lorastack.adapters import models

console = Console()

models_app = typer.Typer(help="Base models: the catalog, fetching and caching.",
                         no_args_is_help=True)
adapters_app = typer.Typer(help="The adapter store: list, show, remove, import.",
                           no_args_is_help=True)


@models_app.command("list")
def models_list() -> None:
    """Show the base-model catalog and what is cached locally."""
    table = Table(title=f"base models (cache: {models.models_dir()})")
    for col in ("alias", "cached", "size MB", "fingerprint", "source", "description"):
        table.add_column(col)
    for row in models.list_bases():
        alias = row["alias"] + (" (default)" if row["default"] else "")
        table.add_row(alias, "yes" if row["cached"] else "no",
                      str(row["size_mb"]) if row["cached"] else "",
                      row["fingerprint"].split(":")[-1][:12], row["source"], row["description"])
    console.print(table)


@models_app.command("pull")
def models_pull(name: str = typer.Argument(models.DEFAULT_BASE,
                                           help="alias, hub id (org/name) or directory")) -> None:
    """Fetch a base model once and cache it as safetensors (a no-op when cached)."""
    try:
        base = models.pull_base(name)
    except models.ModelError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"{base.name}: {base.path}  fingerprint {base.short_fingerprint}")
