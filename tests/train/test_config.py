"""Configs: every shipped one loads; bad settings fail before any model loads, by name."""

from __future__ import annotations

import pytest

from lorastack.train.config import (
    CONFIGS_DIR,
    ConfigError,
    build_config,
    load_config,
    shipped_configs,
)


def test_shipped_configs_exist():
    assert {"reviews-classify", "reviews-condition"} <= set(shipped_configs())


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_validates_and_names_its_command(name):
    cfg = load_config(name)
    assert cfg.name == name
    first = (CONFIGS_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first == f"# lorastack train {name}"


def test_reviews_classify_is_qlora():
    cfg = load_config("reviews-classify")
    assert cfg.quantization == "4bit" and cfg.task.type == "classification"
    assert cfg.task.labels == ["positive", "negative", "neutral"]


def test_overrides_are_parsed_as_yaml():
    cfg = load_config("reviews-classify", ["training.lr=1e-4", "lora.layers=[0, 1]",
                                           "data.limit_train=5"])
    assert cfg.training.lr == 1e-4 and cfg.lora.layers == [0, 1] and cfg.data.limit_train == 5


@pytest.mark.parametrize("raw,expected", [
    ({"training": {"scheduler": "cos"}},
     "training.scheduler: must be one of 'linear', 'cosine' or 'constant' (got 'cos')"),
    ({"quantization": "3bit"}, "quantization: must be one of 'none', '8bit' or '4bit'"),
    ({"trainng": {}}, "trainng: unknown setting"),
    ({"training": {"lr": -1}}, "training.lr: Input should be greater than 0"),
    ({"lora": {"r": 64}}, "lora.r=64 is above the server's max rank 16"),
    ({"lora": {"use_dora": True}}, "vLLM cannot serve DoRA"),
    ({"lora": {"target_modules": ["q_proj", "lm_head"]}}, "['lm_head'] are not servable"),
    ({"name": "../evil"}, "name: String should match pattern"),
    ({"task": {"labels": ["only"]}}, "at least two distinct labels"),
    ({"task": {"type": "generation"}, "data": {"augment": "word_dropout"}},
     "data.augment is for classification tasks only"),
])
def test_bad_settings_name_the_field(raw, expected):
    with pytest.raises(ConfigError) as err:
        build_config(raw)
    assert expected in str(err.value)


def test_not_for_serving_allows_what_vllm_cannot_load():
    cfg = build_config({"lora": {"r": 64, "use_dora": True, "for_serving": False}})
    assert cfg.lora.r == 64


def test_bad_override_and_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("reviews-classify", ["training.lr"])
    with pytest.raises(ConfigError, match="no config 'nope'.*reviews-classify"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
