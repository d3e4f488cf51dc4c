"""`lorastack train` and `lorastack eval` as a user runs them."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from lorastack.commands import app
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
    assert result.stderr.startswith("error: ") and not result.stdout  # as `adapters` says it


def test_ensemble_objective_is_checked_before_any_search(tmp_path):
    store = str(tmp_path / "store")
    alone = runner.invoke(app, ["tune", "reviews-classify", "--trials", "1", "--objective",
                                "macro_f1", "--set", f"store={store}"])
    assert "--objective macro_f1 is how an ensemble's weights are fitted: give --ensemble K" \
        in _failed_cleanly(alone)
    unknown = runner.invoke(app, ["tune", "reviews-classify", "--trials", "1", "--ensemble", "2",
                                  "--objective", "auc", "--set", f"store={store}"])
    assert "unknown ensemble objective 'auc': use one of nll, macro_f1" in _failed_cleanly(
        unknown)
    assert not (tmp_path / "store").exists()  # nothing was trained


def test_eval_unknown_adapter_lists_what_there_is(tmp_path):
    result = runner.invoke(app, ["eval", "nope", "--store", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "nope" in result.output
    assert "Traceback" not in result.output


def _import_tiny_peft(tiny_base, tmp_path) -> str:
    """A PEFT LoRA directory for the tiny base, imported as `lorastack adapters import` does."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    peft_dir, store = tmp_path / "peft", str(tmp_path / "store")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(peft_dir)
    result = runner.invoke(app, ["adapters", "import", str(peft_dir), "--name", "imported",
                                 "--task", "classification", "--labels", "positive,negative",
                                 "--base", str(tiny_base), "--template",
                                 "Review: {text}\\nSentiment:", "--store", store])
    assert result.exit_code == 0, result.output
    return store


def _failed_cleanly(result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_eval_of_an_imported_adapter(tiny_base, review_files, tmp_path):
    store = _import_tiny_peft(tiny_base, tmp_path)
    # no training config: lorastack cannot know its data, and says what to pass
    message = _failed_cleanly(runner.invoke(app, ["eval", "imported", "--store", store]))
    assert "adapter 'imported' was imported" in message and "Pass --data" in message
    assert "fields its prompt uses (label, text)" in message and "--column" in message
    out = tmp_path / "metrics.json"
    result = runner.invoke(app, ["eval", "imported", "--store", store, "--data",
                                 str(review_files["test"]), "--column", "text=review",
                                 "--column", "label=sentiment", "--out", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    right = sum(row[i] for i, row in enumerate(metrics["confusion"]))
    assert metrics["n"] == 12 and metrics["accuracy"] == pytest.approx(right / 12)
    assert metrics["evaluated_on"] == f"{review_files['test']} (all 12 rows)"
    bad = _failed_cleanly(runner.invoke(app, ["eval", "imported", "--store", store, "--data",
                                              str(review_files["test"]), "--column", "text"]))
    assert "--column 'text': expected FIELD=COLUMN" in bad


def test_eval_split_of_a_data_file(tiny_base, review_files, tmp_path):
    store = _import_tiny_peft(tiny_base, tmp_path)
    columns = ["--column", "text=review", "--column", "label=sentiment"]
    # a file without splits: --split cannot apply, and is refused rather than ignored
    message = _failed_cleanly(runner.invoke(app, [
        "eval", "imported", "--store", store, "--data", str(review_files["test"]),
        "--split", "validation", *columns]))
    assert "has no splits (no 'split' column), so --split validation cannot apply" in message
    # a file with a split column: --split picks its rows (default test)
    both = tmp_path / "both.jsonl"
    rows = [dict(json.loads(line), split=split) for split in ("validation", "test")
            for line in review_files[split].read_text().splitlines()[:10 if split == "test"
                                                                       else 4]]
    both.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for split, n in (("validation", 4), (None, 10)):
        out = tmp_path / f"{split}.json"
        result = runner.invoke(app, ["eval", "imported", "--store", store, "--data", str(both),
                                     *columns, "--out", str(out),
                                     *(["--split", split] if split else [])])
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["n"] == n
        assert f"split={split or 'test'}" in " ".join(result.output.split())


def test_eval_of_an_adapter_imported_onto_the_wrong_base(tiny_base, review_files, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2))
    peft_dir, store = tmp_path / "other-peft", str(tmp_path / "store")
    get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                     layers_to_transform=[0])).save_pretrained(peft_dir)
    imported = runner.invoke(app, ["adapters", "import", str(peft_dir), "--name", "misfit",
                                   "--task", "classification", "--labels", "positive,negative",
                                   "--base", str(tiny_base), "--store", store])
    assert imported.exit_code == 0, imported.output
    message = _failed_cleanly(runner.invoke(app, [
        "eval", "misfit", "--store", store, "--data", str(review_files["test"]),
        "--column", "text=review", "--column", "label=sentiment"]))
    assert f"its weights do not fit the base model {tiny_base}" in message
    assert "size mismatch" in message
    assert "Fix: import it with --base set to the model it was trained on" in message


def test_a_model_directory_without_a_tokenizer_is_one_line(tiny_config, tiny_base, tmp_path,
                                                           monkeypatch):
    """A directory with config.json and weights but no tokenizer files: named, with the fix,
    not transformers' traceback."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / name, bare / name)
    config = tmp_path / "bare.yaml"
    config.write_text(json.dumps(dict(tiny_config, base=str(bare),
                                      lora={"r": 4, "for_serving": False})))
    message = _failed_cleanly(runner.invoke(app, ["train", str(config)]))
    assert f"transformers cannot load the tokenizer in {bare}" in message
    assert "copy the tokenizer files" in message
