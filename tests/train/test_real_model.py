"""One short end-to-end run per task on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest

from lorastack.adapters.store import AdapterStore
from lorastack.train import train

pytestmark = pytest.mark.slow


def _short(tmp_path, **over):
    cfg = {"store": str(tmp_path / "store"), "runs_dir": str(tmp_path / "runs"),
           "data": {"source": "drug-reviews", "limit_train": 16, "limit_eval": 8,
                    "max_length": 160},
           "lora": {"r": 8, "alpha": 16, "layers": [28, 29]},
           "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "save_every": 2}}
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_qlora_classification_on_the_real_model(tmp_path, base_model):
    result = train(_short(tmp_path, name="real-cls", quantization="4bit", task={
        "type": "classification", "system": "Classify the review's sentiment.",
        "prompt": "Review: {text}", "labels": ["positive", "negative", "neutral"]}))
    manifest = AdapterStore(tmp_path / "store").resolve(
        "real-cls", base_fingerprint=base_model.fingerprint).manifest
    assert manifest.base_fingerprint == base_model.fingerprint
    assert manifest.training["quantization"] == "4bit"
    test = result.metrics["test"]
    assert test["n"] == 8 and sum(map(sum, test["confusion"])) == 8
    right = sum(test["confusion"][i][i] for i in range(len(test["confusion"])))
    assert test["accuracy"] == pytest.approx(right / 8)  # the confusion's diagonal
    assert (result.run_dir / "training.png").is_file()


def test_generation_on_the_real_model(tmp_path, base_model):
    result = train(_short(tmp_path, name="real-gen", task={
        "type": "generation", "prompt": "Review: {text}\nWhich condition?",
        "target_field": "condition", "max_new_tokens": 8}))
    val = result.metrics["validation"]
    assert val["n"] >= 6 and {"exact_match", "token_f1", "loss"} <= set(val)
    manifest = AdapterStore(tmp_path / "store").resolve("real-gen").manifest
    assert manifest.task == "generation" and manifest.end_of_turn == "<|im_end|>"
