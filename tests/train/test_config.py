"""Configs: every shipped one loads; bad settings fail before any model loads, by name."""

from __future__ import annotations

import re

import pytest

from lorastack.train.base_check import check_against_base
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


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_says_how_long_it_trains(name):
    header = " ".join(line.lstrip("# ") for line in
                      (CONFIGS_DIR / f"{name}.yaml").read_text().splitlines()
                      if line.startswith("#"))
    assert re.search(r"Trains in about \d+ minutes on a 2-core CPU", header), header


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
    ({"name": "../evil"}, "name: adapter '../evil': the name is not plain"),
    ({"name": "a..b"}, "name: adapter 'a..b': the name is not plain"),  # the store's rule
    ({"task": {"labels": ["only"]}}, "task: a classification adapter needs at least two"),
    # the manifest's rules (adapters/manifest.py check_task), before training rather than after
    ({"task": {"labels": ["", "neg"]}}, "at least two non-empty labels"),
    ({"task": {"labels": ["pos", "neg"], "label_words": {"pos": "yes", "neg": "yes"}}},
     "label words must be non-empty and distinct"),
    ({"task": {"prompt": "Classify this review"}}, "must use a record field such as {text}"),
    ({"task": {"prompt": "JSON {text"}}, "not a valid str.format template"),
    ({"search": {"space": {"training.lr": {"low": 1e-4, "high": 1e-3}}, "metric": "f1"}},
     "search.metric='f1' is not a validation metric of a classification task"),
    ({"search": {"space": {"training.lr": {"low": 1e-4, "high": 1e-3}}, "metric": "ece"}},
     "use one of macro_f1, accuracy, loss"),
    ({"task": {"type": "generation"}, "data": {"augment": "word_dropout"}},
     "data.augment is for classification tasks only"),
    ({"training": {"early_stopping_metric": "macro-f1"}},
     ("training.early_stopping_metric='macro-f1' is not a validation metric of a classification "
      "task: use one of macro_f1, accuracy, loss, or null for macro_f1")),
    ({"task": {"type": "generation"}, "training": {"early_stopping_metric": "accuracy"}},
     "use one of exact_match, token_f1, loss, or null for exact_match"),
    ({"lora": {"layers": [-1, 3]}}, "lora.layers: list layer indices from 0"),
    ({"lora": {"layers": []}}, "lora.layers: list layer indices from 0"),
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


# -- settings checked against the base model, before its weights load -------------------------

def _tiny(tiny_base, **lora):
    return build_config({"base": str(tiny_base), "lora": {"for_serving": False, **lora}})


@pytest.mark.parametrize("lora,expected", [
    ({"layers": [1, 2, 5]},
     ("lora.layers: [2, 5] out of range: {base} has 2 layers, 0-1; fix the indices, or null "
      "adapts all")),
    ({"target_modules": ["q_proj", "qkv_proj", "mlp"]},
     ("lora.target_modules: ['qkv_proj', 'mlp'] not found in {base}: the modules LoRA can adapt "
      "are down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj")),
    ({"target_modules": ["q_proj", "lm_head"], "layers": [0]},
     ("['lm_head'] not found in {base}: the modules LoRA can adapt inside the transformer layers "
      "(lora.layers is set) are down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")),
])
def test_settings_the_base_model_lacks_are_named(tiny_base, lora, expected):
    with pytest.raises(ConfigError) as err:
        check_against_base(_tiny(tiny_base, **lora), tiny_base)
    assert expected.format(base=tiny_base) in str(err.value)


def test_settings_the_base_model_has_pass(tiny_base):
    check_against_base(_tiny(tiny_base, target_modules=["q_proj", "self_attn.v_proj"],
                             layers=[0, 1]), tiny_base)
    check_against_base(_tiny(tiny_base, target_modules=["lm_head", "embed_tokens"]), tiny_base)


def test_train_refuses_them_before_any_model_or_data_loads(tiny_config, monkeypatch, tmp_path):
    from lorastack.train import model, run

    def never(*args, **kwargs):
        raise AssertionError("loaded before the config was checked")

    for name in ("load_base", "load_tokenizer", "attach_lora"):
        monkeypatch.setattr(model, name, never)
    monkeypatch.setattr(run, "config_splits", never)
    tiny_config["lora"]["layers"] = [0, 7]
    with pytest.raises(ConfigError, match=r"lora.layers: \[7\] out of range"):
        run.train(tiny_config)
    assert not (tmp_path / "runs" / "tiny-sentiment").exists()  # the run directory untouched


def test_a_manifest_from_before_split_seed_keeps_the_validation_it_was_selected_on():
    """Before data.split_seed, validation was carved with training.seed: a stored adapter's
    config must still name the split it was selected on (ensembles, lorastack eval)."""
    from types import SimpleNamespace

    from lorastack.train.assess import config_from_manifest
    from lorastack.train.config import build_config

    raw = build_config({"training": {"seed": 3}}).model_dump(mode="json", exclude={"search"})
    del raw["data"]["split_seed"]
    old = SimpleNamespace(name="old", training=raw)
    cfg, trained = config_from_manifest(old)
    assert trained and cfg.data.split_seed == 3 and cfg.training.seed == 3
    new = SimpleNamespace(name="new", training={**raw, "data": {**raw["data"], "split_seed": 0}})
    assert config_from_manifest(new)[0].data.split_seed == 0


def test_labels_found_in_the_data_follow_the_manifest_rules():
    """Without task.labels the labels come from the training data, and are held to the rules
    task.labels is (check_task) before any training, not when the adapter is stored."""
    from lorastack.train.data import DataError
    from lorastack.train.run import prompt_format

    same_word = build_config({"task": {"label_words": {"pos": "yes", "neg": "yes"}}})
    records = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    with pytest.raises(DataError, match="label words must be non-empty and distinct"):
        prompt_format(same_word, None, records)
    with pytest.raises(DataError, match="field 'label' of the training data: .*non-empty"):
        prompt_format(build_config({}), None, [*records, {"text": "c", "label": ""}])


def test_a_metrics_line_a_crash_cut_short_does_not_stop_a_resume(tmp_path):
    """metrics.jsonl is appended to; a crash (or a full disk) can leave half a line, which the
    resume's truncation and the run's plot skip instead of raising."""
    from lorastack.train.report import RunLogger, read_metrics

    logger = RunLogger(tmp_path)
    logger.scalars(1, {"train/loss": 1.0})
    logger.scalars(2, {"train/loss": 0.5})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 3, "train/lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    logger.truncate_after(1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "train/loss": 1.0}\n'
