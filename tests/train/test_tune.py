"""`lorastack tune`: an Optuna study over a config's search space, on the tiny model."""

from __future__ import annotations

import json

import pytest
import yaml

from lorastack.adapters.store import AdapterStore
from lorastack.train.config import ConfigError, build_config, load_config
from lorastack.train.tune import tune

pytestmark = pytest.mark.slow

SPACE = {"training.lr": {"low": 1e-3, "high": 1e-2, "log": True},
         "lora.r": {"choices": [2, 4]},
         "lora.top_layers": {"low": 1, "high": 2}}


def _cfg(tiny_config, **search):
    raw = dict(tiny_config)
    raw["training"] = {**raw["training"], "max_steps": 4, "eval_every": 2, "save_every": 2}
    raw["search"] = {"space": SPACE, "startup_trials": 1, **search}
    return build_config(raw)


def test_study_writes_the_best_config_adapter_table_and_plots(tiny_config, tmp_path, capsys):
    cfg = _cfg(tiny_config)
    result = tune(cfg, trials=3)
    tune_dir = tmp_path / "runs" / "tiny-sentiment-tune"
    summary = json.loads((tune_dir / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["complete"] + summary["pruned"] == 3
    assert (tune_dir / "study.db").is_file() and (tune_dir / "history.png").stat().st_size > 0
    # the first trial is the config as written (its values lie in the space)
    first = next(r for r in summary["table"] if r["trial"] == 0)
    assert first["params"] == {"training.lr": 5e-3, "lora.r": 4, "lora.top_layers": 2}
    values = [r["value"] for r in summary["table"] if r["state"] == "complete"]
    assert values == sorted(values, reverse=True) and result.best_value == values[0]
    # the best config is a runnable config with the best trial's values and the user's name
    best = load_config(result.best_config)
    assert best.name == "tiny-sentiment" and best.search is None
    assert best.training.lr == pytest.approx(result.best_params["training.lr"])
    assert best.lora.r == result.best_params["lora.r"]
    assert best.lora.layers == list(range(2 - result.best_params["lora.top_layers"], 2))
    # the best adapter is in the user's store with test metrics; no trial adapter saw test
    adapter = AdapterStore(tmp_path / "store").resolve("tiny-sentiment")
    assert adapter.manifest.metrics.test["n"] == 12
    assert adapter.manifest.training["training"]["lr"] == pytest.approx(best.training.lr)
    trial_store = AdapterStore(tune_dir / "store")
    assert trial_store.list() and all(not a.manifest.metrics.test for a in trial_store.list())
    assert not any((tune_dir / "trials").glob("*/checkpoints/step-*"))  # finished: dropped
    out = capsys.readouterr().out
    assert "lorastack tune: 3 trials" in out and "trial 0 done" in out


def test_resume_reruns_a_cut_short_trial_from_its_checkpoint(tiny_config, tmp_path, monkeypatch,
                                                             capsys):
    from lorastack.train import run

    cfg = _cfg(tiny_config, pruner="none")
    real_train = run.train
    calls = []

    def interrupted(trial_cfg, resume=False, on_step=None):  # Ctrl-C at step 2 of trial 1
        calls.append(resume)

        def step(state):
            on_step(state)
            if len(calls) == 2 and state.step == 2:
                raise KeyboardInterrupt
        return real_train(trial_cfg, resume=resume, on_step=step)

    monkeypatch.setattr(run, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, trials=3)
    tune_dir = tmp_path / "runs" / "tiny-sentiment-tune"
    assert list((tune_dir / "trials").glob("*/checkpoints/step-0000002"))
    result = tune(cfg, trials=3, resume=True)
    out = capsys.readouterr().out
    assert "trial 1 was cut short" in out and "resumed from step-0000002" in out
    assert calls == [False, False, True, False]  # trial 0 ran once; trial 1 resumed once
    assert result.summary["complete"] == 3  # trial 0, the retry of trial 1, one more
    import optuna

    trials = optuna.load_study(study_name="tiny-sentiment",
                               storage=f"sqlite:///{tune_dir / 'study.db'}").trials
    assert trials[1].state.name == "FAIL" and trials[2].user_attrs["retry_of"] == 1
    assert trials[2].params == trials[1].params and trials[2].state.name == "COMPLETE"


def test_search_paths_are_checked_before_any_trial(tiny_config, tmp_path):
    cfg = _cfg(tiny_config)
    bad = cfg.model_copy(update={"search": cfg.search.model_copy(
        update={"space": {"training.learning_rate": SPACE["training.lr"]}})})
    with pytest.raises(ConfigError, match="training.learning_rate"):
        tune(bad, trials=1)
    assert not (tmp_path / "runs" / "tiny-sentiment-tune").exists()
    with pytest.raises(ConfigError, match="no search: section"):
        tune(build_config(dict(tiny_config)), trials=1)


def test_search_section_is_validated_with_the_config(tiny_config):
    raw = dict(tiny_config, search={"space": {"training.lr": {"low": 1e-2, "high": 1e-3}}})
    with pytest.raises(ConfigError, match="above high"):
        build_config(raw)
    raw["search"] = {"space": {"training.lr": {"low": 0, "high": 1e-3, "log": True}}}
    with pytest.raises(ConfigError, match="log: true needs low > 0"):
        build_config(raw)
    raw["search"] = {"space": {"data.split_seed": {"choices": [0, 1]},
                               "training.seed": {"choices": [0, 1]}}}
    with pytest.raises(ConfigError, match=r"cannot vary data.split_seed: .*not be comparable"):
        build_config(raw)
    raw["search"] = {"space": {"lora.layers": {"choices": [None, [0, 1]]}}}
    assert build_config(raw).search.space["lora.layers"].choices == [None, [0, 1]]
    assert yaml.safe_dump(build_config(raw).model_dump(mode="json"))


def test_ensemble_of_the_top_trials_is_fitted_and_stored(tiny_config, tmp_path, capsys):
    from lorastack.adapters import ensembles

    result = tune(_cfg(tiny_config, pruner="none"), trials=3, ensemble=2,
                  ensemble_objective="macro_f1")
    store = tmp_path / "store"
    ens = ensembles.read(store, "tiny-sentiment-ensemble")
    ranked = [r for r in result.summary["table"] if r["state"] == "complete"]
    second = f"tiny-sentiment-trial{ranked[1]['trial']}"
    assert list(ens.weights) == ["tiny-sentiment", second]
    assert sum(ens.weights.values()) == pytest.approx(1.0, abs=1e-9) and ens.temperature > 0
    # pinned to the members as they are in the user's store
    assert [m.content_hash for m in ens.members] == [
        AdapterStore(store).resolve(n).content_hash() for n in ens.weights]
    assert ens.metrics.test["n"] == 12 and "macro_f1" in ens.metrics.validation
    summary = json.loads((tmp_path / "runs" / "tiny-sentiment-tune" / "summary.json").read_text())
    assert summary["ensemble"]["weights"] == ens.weights
    assert summary["ensemble"]["objective"] == "macro_f1"
    assert ens.fitted_on.endswith("weights by macro-F1"), ens.fitted_on
    assert set(summary["ensemble"]["members"]) == set(ens.weights)
    assert (tmp_path / "runs" / "tiny-sentiment-ensemble" / "reliability.png").is_file()
    assert "fitting the ensemble tiny-sentiment-ensemble" in capsys.readouterr().out


def test_a_member_on_other_validation_data_is_refused(tiny_config, tmp_path):
    from lorastack.train import train
    from lorastack.train.data import DataError
    from lorastack.train.ensemble import build_ensemble

    raw = dict(tiny_config)
    raw["training"] = {**raw["training"], "max_steps": 2, "eval_every": 2, "save_every": 2}
    train(build_config(raw))
    train(build_config({**raw, "name": "other-split",  # selected on the test file
                        "data": {**raw["data"], "validation": raw["data"]["test"]}}))
    with pytest.raises(DataError, match="different validation data"):
        build_ensemble("ens", ["tiny-sentiment", "other-split"], store=tmp_path / "store")
    with pytest.raises(DataError, match="at least two different members"):
        build_ensemble("ens", ["tiny-sentiment", "tiny-sentiment"], store=tmp_path / "store")
    with pytest.raises(DataError, match="unknown ensemble objective 'auc'"):
        build_ensemble("ens", ["tiny-sentiment", "other-split"], store=tmp_path / "store",
                       objective="auc")


def test_the_timeout_stops_the_trial_in_flight_at_its_next_step(tiny_config, tmp_path,
                                                                  monkeypatch):
    """--timeout holds to an optimizer step, not to the next evaluation (every 2 steps here)."""
    import types

    import optuna

    from lorastack.train import tune as tune_module

    clock = iter(range(0, 10_000, 10))  # every reading of the clock: 10 s later
    monkeypatch.setattr(tune_module, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))
    with pytest.raises(ConfigError, match="no trial of the search finished"):
        tune(_cfg(tiny_config), trials=3, timeout_min=0.4)  # 24 s: past it at the first step
    study = optuna.load_study(study_name="tiny-sentiment", storage="sqlite:///" + str(
        tmp_path / "runs" / "tiny-sentiment-tune" / "study.db"))
    assert study.trials and all(t.state == optuna.trial.TrialState.PRUNED
                                and t.user_attrs["pruned_at_step"] == 1 for t in study.trials)
