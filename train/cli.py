"""CLI verbs of lorastack.train: `lorastack data ...` (train/eval come with the trainer)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from lorastack.train import data

console = Console()

data_app = typer.Typer(help="Example datasets: the catalog, fetching and caching.",
                       no_args_is_help=True)


@data_app.command("list")
def data_list() -> None:
    """Show the dataset catalog and what is cached locally."""
    table = Table(title=f"datasets (cache: {data.datasets_dir()})")
    for col in ("name", "cached", "splits (rows; labels)", "source", "description"):
        table.add_column(col)
    for row in data.list_datasets():
        splits = "\n".join(
            f"{s}: {v['rows']}; " + ", ".join(f"{k} {n}" for k, n in sorted(v["labels"].items()))
            for s, v in row["splits"].items())
        table.add_row(row["name"], "yes" if row["cached"] else "no", splits, row["source"],
                      row["description"])
    console.print(table)


@data_app.command("pull")
def data_pull(name: str = typer.Argument("drug-reviews", help="a catalog dataset name")) -> None:
    """Fetch and clean a catalog dataset once (a no-op when cached)."""
    try:
        path = data.pull_dataset(name)
    except data.DataError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"{name}: {path}")
