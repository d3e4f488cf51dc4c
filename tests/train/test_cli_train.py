"""`lorastack train` and `lorastack eval` as a user runs them."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from lorastack.cli import app
from lorastack.train import assess

runner = CliRunner()


def _write_config(tmp_path, cfg) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text("# lorastack train tiny.yaml\n" + yaml.safe_dump(cfg))
    return str(path)


def test_train_then_if_missing_skips_then_eval(tiny_config, tmp_path):
    path = _write_config(tmp_path, tiny_config)
    first = runner.invoke(app, ["train", path, "--set", "training.max_steps=2"])
    assert first.exit_code == 0, first.output
    assert "adapter tiny-sentiment written to" in first.output
    again = runner.invoke(app, ["train", path, "--set", "training.max_steps=2", "--if-missing"])
    assert again.exit_code == 0 and "skipping" in again.output
    changed = runner.invoke(app, ["train", path, "--set", "training.max_steps=3",
                                  "--if-missing"])
    assert changed.exit_code == 0 and "skipping" not in changed.output  # new config retrains
    out = tmp_path / "metrics.json"
    evaluated = runner.invoke(app, ["eval", "tiny-sentiment", "--store", tiny_config["store"],
                                    "--out", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "accuracy" in evaluated.output and "macro_f1" in evaluated.output
    assert json.loads(out.read_text())["n"] == 12


def test_eval_matches_the_metrics_the_trainer_recorded(tiny_config):
    from lorastack.adapters.store import AdapterStore
    from lorastack.train import train

    train(tiny_config)
    recorded = AdapterStore(tiny_config["store"]).resolve("tiny-sentiment").manifest.metrics
    again = assess.evaluate_adapter("tiny-sentiment", store=tiny_config["store"],
                                    data=tiny_config["data"]["test"])
    assert again["accuracy"] == recorded.test["accuracy"]
    assert abs(again["loss"] - recorded.test["loss"]) < 1e-4


def test_bad_config_exits_with_a_message(tmp_path):
    result = runner.invoke(app, ["train", "reviews-classify", "--set", "lora.r=99"])
    assert result.exit_code == 1
    assert "lora.r=99 is above the server's max rank 16" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_eval_unknown_adapter_lists_what_there_is(tmp_path):
    result = runner.invoke(app, ["eval", "nope", "--store", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "nope" in result.output
    assert "Traceback" not in result.output
