"""`lorastack tune CONFIG --trials N`: a hyperparameter search over the config's `search:` space.

Optuna does the searching: TPE sampling, a median pruner fed the validation metric at every
evaluation of every trial (a trial that trails the others at the same step stops there), and
the study in SQLite under the tune directory, so a crash or Ctrl-C loses at most the trial in
flight, and `--resume` goes on from there. Every trial is one `train()` run on the train and
validation splits only: the test split is never seen by the search. At the end the best trial's
adapter, evaluated once on test, goes into the store under the config's name, its config is
written as YAML, and the study is drawn (optimisation history, parameter importances).

    runs/<name>-tune/
      study.db         the Optuna study (SQLite)
      trials/          each trial's run directory (metrics.jsonl, training.png)
      store/           each finished trial's adapter
      best.yaml        the best trial's config: `lorastack train runs/<name>-tune/best.yaml`
      summary.json     trials, best, search time; history.png, importance.png
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorastack.adapters.fsutil import atomic_write_json, atomic_write_text
from lorastack.train.base_check import layer_count
from lorastack.train.config import (
    LOWER_IS_BETTER,
    ConfigError,
    TrainConfig,
    build_config,
)
from lorastack.train.search import apply_params, check_paths, current_values


@dataclass
class TuneResult:
    tune_dir: Path
    best_params: dict[str, Any]
    best_value: float
    best_config: Path
    adapter_dir: Path | None
    summary: dict[str, Any]
    ensemble: dict[str, Any] | None = None


def tune(cfg: TrainConfig, *, trials: int, timeout_min: float | None = None,
         resume: bool = False, ensemble: int = 0,
         ensemble_objective: str = "nll") -> TuneResult:
    """Run (or `resume`) the search until `trials` trials are done or `timeout_min` passes.
    With `ensemble` K >= 2, the top K trials are also published and fitted as one ensemble,
    <name>-ensemble (train/ensemble.py), its weights fitted for `ensemble_objective`."""
    import optuna
    from tqdm.auto import tqdm

    from lorastack.adapters.models import resolve_base
    from lorastack.train.ensemble import check_objective

    check_objective(ensemble_objective)  # before the search, not after it

    search = cfg.search
    if search is None:
        raise ConfigError(f"config {cfg.name!r} has no search: section; add one (train/search.py "
                          "shows the format), e.g. search: {space: {training.lr: {low: 1.0e-4, "
                          "high: 1.0e-3, log: true}}}")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    from lorastack.train.run import check_store_name

    check_store_name(cfg)  # the best trial goes into the store under cfg.name
    raw = cfg.model_dump(mode="json", exclude={"search"})
    bad = check_paths(raw, search.space)
    if bad:
        raise ConfigError(f"search.space names settings the config does not have: "
                          f"{', '.join(bad)} (use dotted paths such as training.lr, lora.r)")
    metric = search.metric or cfg.selection_metric
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    base = resolve_base(cfg.base)
    layers = layer_count(base.path)
    tune_dir = Path(cfg.runs_dir) / f"{cfg.name}-tune"
    db = tune_dir / "study.db"
    if db.exists() and not resume:
        print(f"starting a fresh search: discarding the earlier study in {tune_dir} "
              f"(tune with --resume to continue it instead)")
        shutil.rmtree(tune_dir)
    tune_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(
        n_startup_trials=search.startup_trials,
        n_warmup_steps=search.warmup_evaluations * cfg.training.eval_every)
        if search.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(
        study_name=cfg.name, storage=f"sqlite:///{db}", load_if_exists=True,
        direction=direction, pruner=pruner,
        sampler=optuna.samplers.TPESampler(seed=search.seed,
                                           n_startup_trials=search.startup_trials))
    if not study.trials:  # the first trial is the config as written, where it is in the space
        first = current_values(raw, search.space, layers)
        if first:
            study.enqueue_trial(first, user_attrs={"from_config": True})
    _requeue_interrupted(study)
    finished = [t for t in study.trials if t.state.is_finished()
                and t.state != optuna.trial.TrialState.FAIL]
    deadline = None if timeout_min is None else time.monotonic() + 60 * timeout_min
    searched = float(study.user_attrs.get("search_seconds", 0.0))
    bar = tqdm(total=trials, initial=min(len(finished), trials), desc="tune", unit="trial",
               dynamic_ncols=True, position=0)

    def objective(trial) -> float:
        params = {path: spec.suggest(trial, path) for path, spec in search.space.items()}
        trial_raw = apply_params(raw, params, layers)
        name = f"{cfg.name}-t{_digest(params)}"
        trial_raw.update(name=name, store=str(tune_dir / "store"),
                         runs_dir=str(tune_dir / "trials"), evaluate_test=False, replace=True)
        try:
            trial_cfg = build_config(trial_raw, where=f"trial {trial.number}")
        except ConfigError as exc:  # a point of the space the config rules refuse
            trial.set_user_attr("config_error", str(exc))
            tqdm.write(f"trial {trial.number}: skipped, {exc}")
            raise
        trial.set_user_attr("adapter", name)
        tqdm.write(f"trial {trial.number}: " + _describe(params))
        return _run_trial(trial, trial_cfg, metric, deadline)

    def progress(study, trial) -> None:
        nonlocal searched
        bar.update(1)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if done:
            bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)
        searched += (trial.duration.total_seconds() if trial.duration else 0.0)
        study.set_user_attr("search_seconds", searched)
        value = "pruned" if trial.state.name == "PRUNED" else (
            f"{metric}={trial.value:.4f}" if trial.value is not None else trial.state.name)
        tqdm.write(f"trial {trial.number} done: {value} "
                   f"({(trial.duration.total_seconds() if trial.duration else 0) / 60:.1f} min)")

    remaining = trials - len(finished)
    if remaining > 0 and (deadline is None or time.monotonic() < deadline):
        study.optimize(objective, n_trials=remaining,
                       timeout=None if deadline is None else max(1.0, deadline - time.monotonic()),
                       callbacks=[progress], catch=(ConfigError,), gc_after_trial=True)
    bar.close()
    result = _finish(cfg, study, tune_dir, raw, layers, metric)
    if ensemble >= 2:
        result.ensemble = _ensemble(cfg, study, tune_dir, raw, layers, ensemble,
                                     ensemble_objective)
        result.summary["ensemble"] = {k: result.ensemble[k] for k in (
            "name", "objective", "weights", "temperature", "metrics", "members")}
        atomic_write_json(tune_dir / "summary.json", result.summary)
    return result


def _ensemble(cfg: TrainConfig, study, tune_dir: Path, raw: dict, layers: int | None,
              k: int, objective: str) -> dict[str, Any]:
    """The top `k` finished trials as adapters of the user's store (the best under the config's
    name, as _finish wrote it; the others as <name>-trial<N>), fitted as one ensemble."""
    import optuna

    from lorastack.adapters.store import AdapterStore
    from lorastack.train.ensemble import build_ensemble

    tune_store, store = AdapterStore(tune_dir / "store"), AdapterStore(cfg.store)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                and t.user_attrs.get("adapter") and tune_store.exists(t.user_attrs["adapter"])]
    complete.sort(key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")
    if len(complete) < 2:
        raise ConfigError(f"--ensemble {k}: only {len(complete)} trial(s) finished with an "
                          "adapter; an ensemble needs at least 2 (run more trials)")
    if len(complete) < k:
        print(f"--ensemble {k}: only {len(complete)} trials finished; the ensemble has "
              f"{len(complete)} members")
    members = [cfg.name]
    for trial in complete[1:k]:
        name = f"{cfg.name}-trial{trial.number}"
        trial_raw = apply_params(raw, trial.params, layers)
        trial_raw.update(name=name, store=cfg.store, runs_dir=cfg.runs_dir)
        tune_store.copy(trial.user_attrs["adapter"], name, into=store, replace=True,
                        training=trial_raw)
        members.append(name)
    print(f"fitting the ensemble {cfg.name}-ensemble of {', '.join(members)} on validation ...")
    return build_ensemble(f"{cfg.name}-ensemble", members, store=cfg.store, replace=True,
                          runs_dir=cfg.runs_dir, objective=objective)


def _run_trial(trial, cfg: TrainConfig, metric: str, deadline: float | None) -> float:
    """Train one trial; report each validation evaluation to the pruner."""
    import optuna

    from lorastack.train.run import train

    run_dir = Path(cfg.runs_dir) / cfg.name
    resume = any((run_dir / "checkpoints").glob("step-*"))  # the same point, cut short before

    def on_step(state) -> None:
        if deadline is not None and time.monotonic() > deadline:  # at any step: --timeout holds
            trial.set_user_attr("pruned_at_step", state.step)
            raise optuna.TrialPruned("the search's time is up")
        last = state.history[-1] if state.history else None
        if last is None or last.get("step") != state.step or metric not in last:
            return
        trial.report(float(last[metric]), state.step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", state.step)
            raise optuna.TrialPruned(f"validation {metric}={last[metric]:.4f} at step "
                                     f"{state.step} trails the median of earlier trials")

    try:
        result = train(cfg, resume=resume, on_step=on_step)
    except optuna.TrialPruned:
        _drop_checkpoints(run_dir)
        raise
    _drop_checkpoints(run_dir)  # kept only when a trial is cut short: it resumes from them
    val = result.metrics["validation"]
    for key in ("accuracy", "macro_f1", "loss", "exact_match", "token_f1"):
        if key in val:
            trial.set_user_attr(f"validation_{key}", float(val[key]))
    for label, row in (val.get("per_class") or {}).items():
        trial.set_user_attr(f"validation_f1_{label}", float(row["f1"]))
    trial.set_user_attr("best_step", result.summary.get("best_step"))
    trial.set_user_attr("train_seconds", result.summary.get("train_seconds"))
    return float(val[metric])


def _drop_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "best", ignore_errors=True)


def _requeue_interrupted(study) -> None:
    """Trials cut short (left RUNNING by a crash, or failed by Ctrl-C or an error other than a
    config the space cannot build): queued again with the same parameters, once, so that
    their run resumes from its last checkpoint."""
    import optuna

    states = optuna.trial.TrialState
    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING, states.FAIL)):
        if t.number in retried or "config_error" in t.user_attrs or not t.params:
            continue
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        print(f"--resume: trial {t.number} was cut short; it runs again from its checkpoint")


def _finish(cfg: TrainConfig, study, tune_dir: Path, raw: dict, layers: int | None,
            metric: str) -> TuneResult:
    import optuna

    from lorastack.adapters.store import AdapterStore

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError(f"no trial of the search finished (see {tune_dir / 'trials'}); run "
                          "more trials, a longer --timeout, or a smaller space")
    best = study.best_trial
    best_raw = apply_params(raw, best.params, layers)
    best_raw.update(name=cfg.name, store=cfg.store, runs_dir=cfg.runs_dir)
    best_yaml = tune_dir / "best.yaml"
    atomic_write_text(best_yaml, f"# lorastack tune {cfg.name}: trial {best.number}, validation "
                      f"{metric}={best.value:.4f}\n"
                      + yaml.safe_dump(best_raw, sort_keys=False))
    _plots(study, tune_dir)
    adapter_dir, test = None, {}
    tune_store = AdapterStore(tune_dir / "store")
    name = best.user_attrs.get("adapter")
    if name and tune_store.exists(name):
        adapter_dir, test = _publish(cfg, tune_store, name, best_raw)
    rows = _table(study, metric)
    summary = {
        "name": cfg.name, "metric": metric, "direction": study.direction.name.lower(),
        "trials": len(study.trials), "complete": len(complete),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "search_seconds": round(float(study.user_attrs.get("search_seconds", 0.0)), 1),
        "best": {"trial": best.number, "value": best.value, "params": best.params,
                 "validation": {k[len("validation_"):]: v for k, v in best.user_attrs.items()
                                if k.startswith("validation_")},
                 "test": test, "adapter": name},
        "table": rows, "best_config": str(best_yaml),
    }
    atomic_write_json(tune_dir / "summary.json", summary)
    _print_table(rows, metric, best.number)
    return TuneResult(tune_dir, best.params, float(best.value), best_yaml, adapter_dir,
                      summary)


def _publish(cfg: TrainConfig, tune_store, name: str, best_raw: dict) -> tuple[Path, dict]:
    """The best trial's adapter into the user's store under the config's name, with its test
    metrics (the search never saw them) and the config that reproduces it."""
    from lorastack.adapters.manifest import Metrics
    from lorastack.adapters.store import AdapterStore
    from lorastack.train.assess import evaluate_adapter
    from lorastack.train.run import manifest_numbers

    test = {}
    if cfg.evaluate_test:
        print(f"evaluating the best trial's adapter on the test split ({name}) ...")
        test = evaluate_adapter(name, store=tune_store.root, split="test")
    adapter = tune_store.resolve(name)  # read and checked once
    manifest = adapter.manifest.replace(
        name=cfg.name, training=best_raw, metrics=Metrics(
            validation=dict(adapter.manifest.metrics.validation), test=manifest_numbers(test)))
    written = AdapterStore(cfg.store).write(cfg.name, adapter.path, manifest, replace=cfg.replace)
    print(f"adapter {cfg.name} (trial adapter {name}) written to {written.path}")
    return written.path, test


def _table(study, metric: str) -> list[dict]:
    rows = []
    for t in study.trials:
        if not t.state.is_finished():
            continue
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "pruned_at_step": t.user_attrs.get("pruned_at_step"),
                     "minutes": round(t.duration.total_seconds() / 60, 2) if t.duration
                     else None, "params": t.params,
                     "validation": {k[len("validation_"):]: v for k, v in t.user_attrs.items()
                                    if k.startswith("validation_")}})
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    return sorted(rows, key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0)))


def _print_table(rows: list[dict], metric: str, best: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lorastack tune: {len(rows)} trials, by validation {metric}")
    for col in ("trial", "state", metric, "minutes", "parameters"):
        table.add_column(col)
    for r in rows:
        value = "" if r["value"] is None else f"{r['value']:.4f}"
        state = r["state"] + (f" @ step {r['pruned_at_step']}" if r["pruned_at_step"] else "")
        table.add_row(("* " if r["trial"] == best else "") + str(r["trial"]), state, value,
                      "" if r["minutes"] is None else f"{r['minutes']:.1f}",
                      _describe(r["params"]))
    Console().print(table)


def _plots(study, tune_dir: Path) -> None:
    """history.png (value per trial, best so far) and importance.png (fANOVA importances)."""
    from lorastack.train.report import pyplot, save_figure

    pyplot()  # Agg before optuna's plots import pyplot
    import optuna.visualization.matplotlib as ovm

    plots = [("history.png", ovm.plot_optimization_history)]
    if len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 2 and \
            len(study.best_trial.params) >= 1:
        plots.append(("importance.png", ovm.plot_param_importances))
    for filename, draw in plots:
        try:
            ax = draw(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a constant space
            print(f"tune: {filename} not drawn ({exc})")
            continue
        ax.figure.set_size_inches(8, 4.5)
        save_figure(ax.figure, tune_dir / filename)


def _describe(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, list) and len(v) > 4:
            return f"[{v[0]}..{v[-1]}]"
        return str(v)
    return ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in params.items())


def _digest(params: dict[str, Any]) -> str:
    """A short name for a point of the space (the same point resumes the same run)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]

