"""CLI verbs of lorastack.adapters: `lorastack models ...` and `lorastack adapters ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorastack.adapters import models
from lorastack.adapters.manifest import short_hash

console = Console()
err_console = Console(stderr=True)

models_app = typer.Typer(help="Base models: the catalog, your aliases, fetching and caching.",
                         no_args_is_help=True)
adapters_app = typer.Typer(help="The adapter store: list, show, remove, import.",
                           no_args_is_help=True)


@models_app.command("list")
def models_list() -> None:
    """Show the base-model catalog and your aliases, and what is cached locally."""
    try:
        rows = models.list_bases()
    except models.ModelError as exc:
        raise fail(exc) from exc
    table = Table(title=f"base models (cache: {models.models_dir()})")
    for col in ("alias", "kind", "cached", "size MB", "fingerprint", "source", "description"):
        table.add_column(col)
    for row in rows:
        alias = row["alias"] + (" (default)" if row["default"] else "")
        table.add_row(escape(alias), row["kind"], "yes" if row["cached"] else "no",
                      str(row["size_mb"]) if row["cached"] else "",
                      short_hash(row["fingerprint"]), escape(row["source"]),
                      escape(row["description"]))
    console.print(table)


@models_app.command("pull", short_help="Fetch (or convert, for a GGUF file) a base model once and "
                    "cache it as safetensors.")
def models_pull(name: str = typer.Argument(
        models.DEFAULT_BASE, help="alias, hub id (org/name), directory or GGUF file")) -> None:
    """Fetch (or convert, for a GGUF file) a base model once and cache it as safetensors
    (a no-op when cached)."""
    try:
        base = models.pull_base(name)
    except models.ModelError as exc:
        raise fail(exc) from exc
    console.print(f"{escape(base.name)}: {base.path}  fingerprint {base.short_fingerprint}")


@models_app.command("add", short_help="Name a base model of yours, for --base and configs.")
def models_add(
    name: Annotated[str, typer.Argument(help="the alias: letters, digits, '.', '_', '-'")],
    path: Annotated[str, typer.Argument(help="a GGUF file, a model directory or a hub id")],
    replace: Annotated[bool, typer.Option("--replace", help="redefine an existing alias")]
    = False,
) -> None:
    """Name a base model of yours: NAME then works wherever a base model is asked for
    (--base, configs) and adapters record NAME. Nothing is converted until `models pull NAME`."""
    try:
        entry = models.add_alias(name, path, replace=replace)
    except models.ModelError as exc:
        raise fail(exc) from exc
    console.print(f"{escape(name)} -> {escape(entry['target'])} ({entry['kind']})")
    cached = any(r["alias"] == name and r["cached"] for r in models.list_bases())
    if entry["kind"] != "directory" and not cached:
        console.print(f"run `lorastack models pull {escape(name)}` to "
                      f"{'convert' if entry['kind'] == 'gguf' else 'fetch'} it now")


@models_app.command("remove")
def models_remove(name: Annotated[str, typer.Argument(help="a user alias")]) -> None:
    """Forget a user alias. The model files and any converted copy stay where they are."""
    try:
        row = next((r for r in models.list_bases() if r["alias"] == name), None)
        entry = models.remove_alias(name)
    except models.ModelError as exc:
        raise fail(exc) from exc
    copy = row["path"] if row and row["path"].startswith(str(models.models_dir())) else ""
    kept = (f"its converted copy {copy} ({row['size_mb']} MB) stays until you delete it"
            if row and copy else "the model files stay where they are")
    console.print(f"removed alias {escape(name)} (-> {escape(entry['target'])}); no files were "
                  f"deleted: {escape(kept)}")


# -- lorastack adapters ... ------------------------------------------------------------------

StoreOption = typer.Option(None, "--store", envvar="LORASTACK_STORE", show_default=False,
                           help="adapter store directory [default: $LORASTACK_HOME/adapters]")


def fail(exc: Exception) -> typer.Exit:
    """Print `error: <exc>` on stderr, on one line, and return the exit to raise: how every
    command of `lorastack` (adapters/, train/) reports an error the user can fix."""
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(1)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


LIST_COLUMNS = ("name", "task", "base", "rank", "size", "key metric", "created")


@adapters_app.command("list")
def adapters_list(
    store: Path = StoreOption,
    plain: bool = typer.Option(False, "--plain", help="one line per adapter, columns aligned "
                               "(the default when stdout is not a terminal wide enough for "
                               "the table)"),
    as_json: bool = typer.Option(False, "--json", help="a JSON list of objects, full fields "
                                 "(fingerprint, labels, metrics, path)"),
) -> None:
    """Show the adapters in the store, and entries that are not valid adapters.

    On a terminal wide enough, a table; piped or narrower, plain aligned lines that never wrap
    a cell; --json for scripts. Entries that are not valid adapters go to stderr.
    """
    import json

    from lorastack.adapters.store import AdapterStore

    st = AdapterStore(store)
    adapters, problems = st.scan()
    if as_json:
        typer.echo(json.dumps([_adapter_record(a) for a in adapters], indent=2))
    else:
        rows = [_adapter_row(a) for a in adapters]
        table = _adapters_table(st.root, rows)
        if plain or not _fits(table):
            _print_plain(st.root, rows)
        else:
            console.print(table)
    for p in problems:
        err_console.print(f"[yellow]skipped {escape(p.name)}:[/yellow] {escape(p.message)}",
                          soft_wrap=True)
    if not as_json:
        _print_ensembles(st.root)


def _print_ensembles(root: Path) -> None:
    """The store's ensembles, one line each (`lorastack ensemble` writes them)."""
    from lorastack.adapters import ensembles
    from lorastack.adapters.manifest import AdapterError

    for name in ensembles.names(root):
        try:
            ens = ensembles.read(root, name)
        except AdapterError as exc:
            err_console.print(f"[yellow]skipped ensemble {escape(name)}:[/yellow] "
                              f"{escape(str(exc))}", soft_wrap=True)
            continue
        members = ", ".join(f"{m} {w:.2f}" for m, w in ens.weights.items())
        f1 = ens.metrics.test.get("macro_f1", ens.metrics.validation.get("macro_f1"))
        console.print(f"ensemble {escape(name)}: {escape(members)}" +
                      (f"; macro-F1 {f1:.3f}" if f1 is not None else ""), soft_wrap=True)


def _adapter_row(a) -> dict[str, str]:
    """The listing's cells for one adapter, short forms (the table and the plain lines)."""
    m = a.manifest
    key = m.key_metric()
    return {"name": a.name, "task": m.task + (f" ({len(m.labels)} labels)" if m.labels else ""),
            "base": f"{m.base_model} {short_hash(m.base_fingerprint, 8)}",
            "rank": str(m.lora.rank), "size": _size(a.weights_bytes),
            "key metric": f"{key[1]} {key[2]:.4g} ({key[0]})" if key else "",
            "created": m.created_at[:10]}


def _adapter_record(a) -> dict:
    """One adapter for --json: the listing's fields, in full."""
    m = a.manifest
    key = m.key_metric()
    return {"name": a.name, "path": str(a.path), "task": m.task, "labels": list(m.labels),
            "base": m.base_model, "base_fingerprint": m.base_fingerprint,
            "rank": m.lora.rank, "alpha": m.lora.alpha,
            "target_modules": list(m.lora.target_modules), "size_bytes": a.weights_bytes,
            "key_metric": ({"split": key[0], "metric": key[1], "value": key[2]}
                           if key else None),
            "metrics": {"validation": dict(m.metrics.validation),
                        "test": dict(m.metrics.test)},
            "created_at": m.created_at}


def _adapters_table(root: Path, rows: list[dict[str, str]]) -> Table:
    table = Table(title=f"adapters ({root})")
    for col in LIST_COLUMNS:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*(escape(row[col]) for col in LIST_COLUMNS))
    return table


def _fits(table: Table) -> bool:
    """Whether stdout is a terminal that shows `table` without wrapping a cell."""
    from rich.measure import Measurement

    if not console.is_terminal:
        return False
    unbounded = console.options.update_width(1 << 20)  # measure the table's natural width
    return Measurement.get(console, unbounded, table).maximum <= console.width


def _print_plain(root: Path, rows: list[dict[str, str]]) -> None:
    """A header and one line per adapter, columns padded to align; nothing is cut or wrapped.
    An empty store prints the header only and says so on stderr."""
    widths = {col: max([len(col)] + [len(r[col]) for r in rows]) for col in LIST_COLUMNS}
    for row in [{col: col for col in LIST_COLUMNS}, *rows]:
        typer.echo("  ".join(row[col].ljust(widths[col]) for col in LIST_COLUMNS).rstrip())
    if not rows:
        err_console.print(f"no adapters in {escape(str(root))}", soft_wrap=True)


@adapters_app.command("show")
def adapters_show(name: str = typer.Argument(..., help="adapter name"),
                  store: Path = StoreOption) -> None:
    """Check an adapter fully and print its manifest."""
    from lorastack.adapters.manifest import AdapterError
    from lorastack.adapters.store import AdapterStore

    try:
        adapter = AdapterStore(store).resolve(name)
    except AdapterError as exc:
        raise fail(exc) from exc
    from lorastack.adapters.store import version_id

    console.print(f"[bold]{escape(adapter.name)}[/bold]  {escape(str(adapter.path))}  "
                  f"weights {_size(adapter.weights_bytes)}  version {version_id(adapter)}")
    console.print_json(adapter.manifest.to_json())


@adapters_app.command("rm")
def adapters_rm(name: str = typer.Argument(..., help="adapter name"),
                yes: bool = typer.Option(False, "--yes", "-y", help="do not ask"),
                store: Path = StoreOption) -> None:
    """Remove an adapter (or an ensemble) from the store."""
    from lorastack.adapters import ensembles
    from lorastack.adapters.manifest import AdapterError
    from lorastack.adapters.store import AdapterStore

    st = AdapterStore(store)
    try:
        st.path(name)  # refuse a bad name before asking
        kind = "ensemble" if not st.exists(name) and name in ensembles.names(st.root) \
            else "adapter"
        if not yes and not typer.confirm(f"remove {kind} {name!r} from {st.root}?"):
            err_console.print("not removed")
            raise typer.Exit(1)
        if kind == "ensemble":
            ensembles.remove(st.root, name)
        else:
            st.remove(name)
    except AdapterError as exc:
        raise fail(exc) from exc
    console.print(f"removed {name}")


@adapters_app.command("import")
def adapters_import(
    src: Annotated[Path, typer.Argument(help="a PEFT LoRA directory (config + safetensors)")],
    name: str = typer.Option(..., "--name", help="name in the store"),
    task: str = typer.Option(..., "--task", help="classification or generation"),
    labels: str = typer.Option("", "--labels", help="classification labels, comma-separated"),
    base: str = typer.Option(models.DEFAULT_BASE, "--base",
                             help="the base model it was trained on (must be cached)"),
    template: str = typer.Option("{text}", "--template",
                                 help="prompt template over record fields, e.g. "
                                 "'Review: {text}\\nSentiment:'"),
    replace: bool = typer.Option(False, "--replace", help="replace an adapter of that name"),
    store: Path = StoreOption,
) -> None:
    """Import an external PEFT LoRA directory into the store (pickle weights are refused)."""
    from lorastack.adapters.manifest import AdapterError
    from lorastack.adapters.store import AdapterStore

    label_list = [lab.strip() for lab in labels.split(",") if lab.strip()]
    try:
        adapter = AdapterStore(store).import_dir(
            src, name, task, labels=label_list, base=base,
            prompt_template=template.replace("\\n", "\n"), replace=replace)
    except AdapterError as exc:
        raise fail(exc) from exc
    console.print(f"imported {adapter.name}: {adapter.path}")
