"""CLI verbs of lorastack.train: `lorastack data ...` (train/eval come with the trainer)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorastack.adapters.cli import StoreOption, fail
from lorastack.train import data

console = Console()

data_app = typer.Typer(help="Example datasets: the catalog, fetching and caching.",
                       no_args_is_help=True)


@contextmanager
def _user_errors(dist=None) -> Iterator[None]:
    """An error the user can fix (config, data, adapter, base model, launch) as one line and exit
    status 1; in one of several processes, saying which."""
    from lorastack.adapters.manifest import AdapterError
    from lorastack.adapters.models import ModelError
    from lorastack.train.config import ConfigError
    from lorastack.train.distributed import LaunchError

    try:
        yield
    except (ConfigError, data.DataError, AdapterError, ModelError, LaunchError) as exc:
        active = dist is not None and dist.active
        raise fail(RuntimeError(f"process {dist.rank} of {dist.world}: {exc}") if active
                   else exc) from exc


OBJECTIVE_HELP = ("what the ensemble's weights are fitted for on validation: nll (honest "
                  "probabilities) or macro_f1 (the rare classes, at some cost in NLL)")


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
    with _user_errors():
        path = data.pull_dataset(name)
    console.print(f"{name}: {path}")


def train_command(
    config: str = typer.Argument(..., help="a YAML file or a shipped config name "
                                 "(reviews-classify, reviews-condition)"),
    set_: list[str] = typer.Option(  # noqa: B008 (typer's idiom)
        [], "--set", help="override a setting: section.key=value (repeatable)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run's last "
                                "checkpoint"),
    if_missing: bool = typer.Option(False, "--if-missing", help="do nothing when the store "
                                    "already has this adapter trained with this same config"),
    nproc: int = typer.Option(None, "--nproc", help="train in N processes, data parallel "
                              "(torchrun; gloo on CPU, nccl with one GPU per process). "
                              "training.batch_size stays the global batch, split over the N "
                              "processes, so N processes train what 1 process does (same steps, "
                              "same checkpoints, resumable with another N); only process 0 "
                              "evaluates and writes the run directory and the store. At most "
                              "one process per CPU core (per GPU with CUDA)."),
    fsdp: bool = typer.Option(False, "--fsdp", help="with --nproc: shard the frozen base's "
                              "weights over the processes (FSDP; training.fsdp=true), each "
                              "holding 1/N of them; trains what --nproc alone trains"),
) -> None:
    """Train a LoRA/QLoRA adapter and write it into the adapter store."""
    from lorastack.train import distributed
    from lorastack.train.config import ConfigError, load_config

    dist = distributed.from_env()  # a worker that torchrun started, or this very process
    with _user_errors(dist):
        if fsdp and not dist.active and (nproc or 1) < 2:
            raise distributed.LaunchError("--fsdp shards the base over several processes: "
                                          "give --nproc N with N >= 2")
        set_ = [*set_, "training.fsdp=true"] if fsdp else set_
        if nproc is not None and dist.active and nproc != dist.world:
            raise distributed.LaunchError(f"--nproc {nproc}, but torchrun started "
                                          f"{dist.world} processes: drop --nproc under torchrun")
        if nproc is not None and not dist.active:
            distributed.check_nproc(nproc)
        cfg = load_config(config, set_)  # validated before anything heavy loads
        if nproc is not None and isinstance(cfg.training.batch_size, int) \
                and cfg.training.batch_size < nproc:
            raise ConfigError(f"training.batch_size={cfg.training.batch_size} is the global "
                              f"batch, split over the processes: --nproc {nproc} needs it to be "
                              f"at least {nproc}")
        if if_missing and dist.is_main and _already_trained(cfg):
            console.print(f"adapter [bold]{cfg.name}[/bold] is already in the store, trained "
                          f"with this config: skipping (drop --if-missing to retrain)")
            return
        if nproc is not None and nproc > 1 and not dist.active:
            _launch(nproc, config, set_, resume)
            return
        from lorastack.train.run import train

        result = train(cfg, resume=resume)
    if not dist.is_main:
        return
    console.print(f"adapter [bold]{result.name}[/bold] written to {result.adapter_dir}; run "
                  f"directory {result.run_dir} (training.png, metrics.jsonl, tensorboard/)")


def _launch(nproc: int, config: str, set_: list[str], resume: bool) -> None:
    """`lorastack train` again, in `nproc` processes under torchrun; exit as they did."""
    from lorastack.train import distributed

    target = ["-m", "lorastack", "train", config,
              *[arg for item in set_ for arg in ("--set", item)],
              *(["--resume"] if resume else [])]
    status = distributed.launch(nproc, target)
    if status != 0:  # the launcher said which process failed, after that process's message
        raise typer.Exit(status)


def eval_command(
    target: str = typer.Argument(..., help="adapter name in the store (or, with --zero-shot, "
                                 "a config)"),
    data_source: str = typer.Option(None, "--data", help="catalog dataset, data file or "
                                    "directory of <split> files (default: what the adapter "
                                    "was trained on; needed for an imported adapter)"),
    split: str = typer.Option(None, "--split", help="split to evaluate: of a catalog dataset, "
                              "of a directory's files, or a file's 'split' column (default "
                              "test; a file without splits is used whole)"),
    column: list[str] = typer.Option(  # noqa: B008 (typer's idiom)
        [], "--column", help="FIELD=COLUMN: the prompt's or label's field is that column of "
        "the data (repeatable), e.g. --column text=review"),
    zero_shot: bool = typer.Option(False, "--zero-shot", help="evaluate the config's base model "
                                   "without an adapter, with the same prompt and scoring"),
    limit: int = typer.Option(None, help="only the first N records"),
    store: str = StoreOption,
    out: str = typer.Option(None, help="also write the metrics as JSON to this file"),
) -> None:
    """Evaluate an adapter (or the base model zero-shot) on a split."""
    from lorastack.train import assess

    with _user_errors():
        columns = _columns(column)
        if zero_shot:
            metrics = assess.evaluate_zero_shot(target, data=data_source, split=split,
                                                columns=columns, limit=limit)
        else:
            metrics = assess.evaluate_adapter(target, data=data_source, split=split,
                                              store=store, columns=columns, limit=limit)
    title = f"{target}{' (zero-shot base)' if zero_shot else ''} on {metrics['evaluated_on']}"
    table = Table(title=escape(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, (int, float)):
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for label, row in metrics.get("per_class", {}).items():
        table.add_row(f"f1 {label}", f"{row['f1']:.4f}")
    console.print(table)
    if out:
        from lorastack.adapters.fsutil import atomic_write_json

        atomic_write_json(Path(out), metrics)


def _columns(items: list[str]) -> dict[str, str] | None:
    """--column FIELD=COLUMN options as a column mapping."""
    columns = {}
    for item in items:
        field, sep, col = item.partition("=")
        if not sep or not field.strip() or not col.strip():
            raise data.DataError(f"--column {item!r}: expected FIELD=COLUMN, e.g. "
                                 f"--column text=review")
        columns[field.strip()] = col.strip()
    return columns or None


def _already_trained(cfg) -> bool:
    from lorastack.adapters.manifest import AdapterError
    from lorastack.adapters.store import AdapterStore

    try:
        adapter = AdapterStore(cfg.store).resolve(cfg.name)
    except AdapterError:
        return False
    return adapter.manifest.training == cfg.model_dump(mode="json", exclude={"search"})


def tune_command(
    config: str = typer.Argument(..., help="a YAML file or shipped config name with a search: "
                                 "section (train/search.py shows the format)"),
    trials: int = typer.Option(..., "--trials", help="trials in the study, counting those an "
                               "earlier --resume'd run finished"),
    timeout: float = typer.Option(None, "--timeout", help="stop the search after MIN minutes "
                                  "(the trial in flight stops at its next optimizer step)"),
    resume: bool = typer.Option(False, "--resume", help="continue the study in "
                                "runs/<name>-tune/study.db; a trial cut short reruns from its "
                                "last checkpoint"),
    set_: list[str] = typer.Option(  # noqa: B008 (typer's idiom)
        [], "--set", help="override a setting: section.key=value (repeatable)"),
    ensemble: int = typer.Option(0, "--ensemble", metavar="K", help="also publish the top K "
                                 "trials and fit them as one ensemble, <name>-ensemble"),
    objective: str = typer.Option("nll", "--objective", help=OBJECTIVE_HELP),
) -> None:
    """Search hyperparameters with Optuna; the best adapter goes into the store."""
    from lorastack.train.config import ConfigError, load_config
    from lorastack.train.tune import tune

    with _user_errors():
        cfg = load_config(config, set_)
        if ensemble == 1 or ensemble < 0:
            raise ConfigError(f"--ensemble K needs K >= 2 members, got {ensemble}")
        if objective != "nll" and not ensemble:
            raise ConfigError(f"--objective {objective} is how an ensemble's weights are "
                              "fitted: give --ensemble K with it")
        result = tune(cfg, trials=trials, timeout_min=timeout, resume=resume,
                      ensemble=ensemble, ensemble_objective=objective)
    if result.ensemble is not None:
        _ensemble_table(result.ensemble)
    console.print(f"best trial: validation {result.summary['metric']}="
                  f"{result.best_value:.4f}; config {result.best_config}; "
                  + (f"adapter [bold]{cfg.name}[/bold] in {result.adapter_dir}"
                     if result.adapter_dir else "no adapter written"))


def calibrate_command(
    name: str = typer.Argument(..., help="a classification adapter in the store"),
    store: str = StoreOption,
    runs_dir: str = typer.Option("runs", "--runs-dir", help="where reliability.png goes "
                                 "(<runs-dir>/<name>/)"),
) -> None:
    """Fit a classification adapter's temperature on its validation split (temperature
    scaling; its label bias first when its config has task.label_bias: macro_f1) and store
    it in its manifest; the server applies it from the next request on."""
    from lorastack.train.assess import calibrate_adapter

    with _user_errors():
        result = calibrate_adapter(name, store=store, runs_dir=runs_dir)
    from lorastack.adapters.labels import describe_bias

    shift = describe_bias(result["label_bias"])
    table = Table(title=escape(f"{name}: temperature {result['temperature']:.3f}"
                               + (f", label bias {shift}" if shift else "")))
    for col in ("split", "ECE before", "ECE after", "NLL before", "NLL after"):
        table.add_column(col, justify="right")
    for split in ("validation", "test"):
        if split in result:
            m = result[split]
            table.add_row(split, f"{m['ece_uncalibrated']:.4f}", f"{m['ece']:.4f}",
                          f"{m['nll_uncalibrated']:.4f}", f"{m['nll']:.4f}")
    console.print(table)
    console.print(f"reliability diagram: {result['plot']}")


def ensemble_command(
    name: str = typer.Argument(..., help="the ensemble's name (not an adapter's)"),
    members: list[str] = typer.Option(  # noqa: B008 (typer's idiom)
        ..., "--members", "-m", help="classification adapters of one label set, trained on the "
        "same data (repeat the option, or give several)"),
    store: str = StoreOption,
    replace: bool = typer.Option(False, "--replace", help="fit an existing ensemble again"),
    runs_dir: str = typer.Option("runs", "--runs-dir", help="where reliability.png goes "
                                 "(<runs-dir>/<name>/)"),
    objective: str = typer.Option("nll", "--objective", help=OBJECTIVE_HELP),
) -> None:
    """Fit an ensemble of classification adapters on their validation split (mixture weights,
    then a temperature) and store it; the gateway serves it under its name."""
    from lorastack.train.ensemble import build_ensemble

    with _user_errors():
        result = build_ensemble(name, members, store=store, replace=replace, runs_dir=runs_dir,
                                objective=objective)
    _ensemble_table(result)


def _ensemble_table(result: dict) -> None:
    """The ensemble against each of its members, on validation and test."""
    table = Table(title=escape(f"ensemble {result['name']}: weights fitted for validation "
                               f"{result['objective']}, temperature "
                               f"{result['temperature']:.3f}"))
    for col in ("model", "weight", "val macro-F1", "test macro-F1", "test accuracy", "test ECE"):
        table.add_column(col, justify="right" if col != "model" else "left", overflow="fold")

    def cells(m: dict) -> list[str]:
        val, test = m.get("validation", {}), m.get("test", {})
        return [f"{val.get('macro_f1', float('nan')):.4f}",
                f"{test.get('macro_f1', float('nan')):.4f}" if test else "-",
                f"{test.get('accuracy', float('nan')):.4f}" if test else "-",
                f"{test.get('ece', float('nan')):.4f}" if test else "-"]

    table.add_row(escape(result["name"]), "1", *cells(result["metrics"]))
    for member, weight in result["weights"].items():
        table.add_row(escape(member), f"{weight:.3f}", *cells(result["members"][member]))
    console.print(table)
    console.print(f"written to {result['path']}; reliability diagram: {result['plot']}")


def plan_command(
    config: str = typer.Argument(..., help="shipped config name or YAML path"),
    device: str = typer.Option("cpu", "--device", help="cpu (this machine's RAM), cuda (the "
                               "GPU's memory), or a size: cuda:24GB, cpu:16GB"),
    set_: list[str] = typer.Option([], "--set", help="override a setting, e.g. "  # noqa: B008
                                   "training.batch_size=16 (repeatable)"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes the run will use "
                              "(lorastack train --nproc): the plan is one process's share"),
) -> None:
    """Memory plan of a training run, before any weights load; exit 1 when it does not fit."""
    from lorastack.adapters.models import ModelError
    from lorastack.train.autobatch import fit_to_memory
    from lorastack.train.config import ConfigError, load_config
    from lorastack.train.data import DataError
    from lorastack.train.plan import PlanError, Shape, kept_tokens, parse_device, plan_memory

    try:
        dev = parse_device(device)
        cfg = load_config(config, list(set_ or []))
        kept = kept_tokens(cfg, nproc, Shape.from_base(cfg.base))
    except (ConfigError, DataError, ModelError, OSError) as exc:  # PlanError is a ConfigError
        import sys

        print(f"error: {exc}".replace("\n", " "), file=sys.stderr)
        raise typer.Exit(2) from None
    try:
        cfg, chosen = fit_to_memory(cfg, nproc, device, kept)  # batch_size auto, memory_budget
    except PlanError as exc:
        print(f"does not fit: {exc}")
        raise typer.Exit(1) from None
    plan = plan_memory(cfg, dev, batch_size=-(-int(cfg.training.batch_size) // nproc),
                       processes=nproc, kept_tokens=kept)
    print_plan(plan, title=f"memory plan: {cfg.name} ({cfg.base}, {cfg.quantization})")
    if chosen:
        print(chosen)
    raise typer.Exit(0 if plan.fits else 1)


def print_plan(plan, title: str = "memory plan") -> None:
    """A train/plan.MemoryPlan as a table, then its verdict."""
    from lorastack.train.plan import MiB

    table = Table(title=f"{title}, batch {plan.batch_size} x {plan.max_length}, "
                  f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}")
    for col, justify in (("row", "left"), ("MiB", "right"), ("note", "left")):
        table.add_column(col, justify=justify)
    for r in plan.rows:
        table.add_row(r.name, f"{r.bytes / MiB:,.0f}", r.note)
    table.add_row("[bold]training total[/bold]", f"[bold]{plan.total / MiB:,.0f}[/bold]", "")
    for r in plan.serving:
        table.add_row(r.name, f"{r.bytes / MiB:,.0f}", r.note)
    table.add_row("[bold]serving total[/bold]", f"[bold]{plan.serving_total / MiB:,.0f}[/bold]",
                  "plus vLLM's own runtime")
    console = Console(width=120)
    console.print(table)
    console.print(plan.verdict)
