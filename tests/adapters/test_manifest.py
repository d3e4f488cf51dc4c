"""The manifest: round trip, field checks, names, and what the serving engine accepts."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from lorastack.adapters import labels as label_scoring
from lorastack.adapters.manifest import (
    FORMAT_VERSION,
    AdapterError,
    AdapterManifest,
    InvalidNameError,
    LoraSettings,
    ManifestError,
    NotServableError,
    ServingLimits,
    UnknownFormatVersionError,
    check_name,
    check_servable,
    unservable_lora,
)

pytestmark = pytest.mark.usefixtures("store_env")


def test_round_trip_through_json(fake):
    manifest = fake.make_manifest("reviews", label_words={"negative": " bad", "positive": " good"})
    text = manifest.to_json()
    again = AdapterManifest.from_json(text)
    assert again == manifest
    data = json.loads(text)
    assert data["format_version"] == FORMAT_VERSION
    assert data["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert again.label_word("positive") == " good"


def test_generation_manifest_and_unknown_extra_fields_are_read(fake):
    data = fake.make_manifest("qa", task="generation").to_dict()
    data["added_by_a_newer_writer"] = {"x": 1}
    data["lora"]["also_new"] = True
    manifest = AdapterManifest.from_dict(data)
    assert manifest.task == "generation" and manifest.labels == ()


def test_key_metric_prefers_test_accuracy(fake):
    assert fake.make_manifest("a").key_metric() == ("test", "accuracy", 0.75)


@pytest.mark.parametrize("change, words", [
    ({"task": "regression"}, "task: must be one of 'classification' or 'generation'"),
    ({"labels": ("only",)}, "at least two"),
    ({"labels": ("a", "a")}, "labels repeat"),
    ({"label_words": {"other": "x"}}, "label_words keys"),
    ({"label_words": {"negative": "yes", "positive": "yes"}}, "distinct"),
    ({"prompt_template": "no field here"}, "must use a record field"),
    ({"prompt_template": "broken {text"}, "not a valid str.format"),
    ({"base_fingerprint": "abc"}, "base_fingerprint: must be 'sha256:' and 64 hex digits"),
    ({"data_fingerprint": "md5:1"}, "data_fingerprint: must be '' or 'sha256:'"),
    ({"created_at": "yesterday"}, "created_at: must be an ISO 8601 time"),
    ({"chat_format": "no slot"}, "chat_format: must contain the slot {input} exactly once"),
    ({"score_end_of_turn": "yes"}, "score_end_of_turn: Input should be a valid boolean"),
    ({"versions": {"torch": 2}}, r"versions.torch: Input should be a valid string \(got 2\)"),
])
def test_bad_fields_are_refused_with_the_field_named(fake, change, words):
    with pytest.raises(AdapterError, match=words):
        fake.make_manifest("a", **change)


def test_manifest_name_must_be_plain(fake):
    data = fake.make_manifest("a").to_dict() | {"name": "../up"}
    with pytest.raises(AdapterError, match="not plain"):
        AdapterManifest.from_dict(data)


def test_generation_has_no_labels(fake):
    with pytest.raises(ManifestError, match="no labels"):
        fake.make_manifest("a", task="generation", labels=("x", "y"))


@pytest.mark.parametrize("kwargs, words", [
    ({"rank": 0}, "lora.rank: Input should be greater than 0"), ({"rank": True}, "lora.rank"),
    ({"rank": "8"}, "lora.rank"), ({"alpha": -1}, "lora.alpha"), ({"alpha": "16"}, "lora.alpha"),
    ({"alpha": float("inf")}, "lora.alpha: must be a finite number"),
    ({"dropout": 1.0}, "lora.dropout"), ({"target_modules": ()}, "lora.target_modules"),
    ({"target_modules": ("q_proj", "")}, "lora.target_modules"),
    ({"use_dora": "yes"}, "lora.use_dora"),
])
def test_lora_settings_are_checked(kwargs, words):
    values = {"rank": 8, "alpha": 16, "target_modules": ("q_proj",)} | kwargs
    with pytest.raises(ManifestError, match=words):
        LoraSettings(**values)


def test_unknown_format_version_says_to_upgrade(fake):
    data = fake.make_manifest("a").to_dict() | {"format_version": FORMAT_VERSION + 1}
    with pytest.raises(UnknownFormatVersionError) as info:
        AdapterManifest.from_dict(data)
    assert "upgrade lorastack" in str(info.value)


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
    (json.dumps({"format_version": 1, "name": "a"}), "task: required.*; base_model: required"),
])
def test_unparseable_manifests(text, words):
    with pytest.raises(ManifestError, match=words):
        AdapterManifest.from_json(text)


def test_missing_nested_field_is_a_manifest_error(fake):
    data = fake.make_manifest("a").to_dict()
    del data["lora"]["rank"]
    with pytest.raises(ManifestError, match="lora.rank: required"):
        AdapterManifest.from_dict(data)


@pytest.mark.parametrize("name", ["reviews", "a", "Model_2.1-x", "x" * 64])
def test_plain_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../x", "a/b", "a\\b", ".hidden", "-x", "a b",
                                  "a..b", "x" * 65, "naïve", "a\x00b"])
def test_other_names_are_refused_with_the_rule(name):
    with pytest.raises(InvalidNameError) as info:
        check_name(name)
    assert "Fix: use 1 to 64 characters" in str(info.value)


def test_errors_survive_pickling_with_their_fields():
    exc = NotServableError("rank 32 is above", "big", "/s/big/adapter_config.json", "retrain")
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is NotServableError and str(again) == str(exc)
    assert (again.adapter, again.file, again.fix) == ("big", exc.file, "retrain")
    assert isinstance(again, ValueError)


# -- check_servable ------------------------------------------------------------------------

def test_default_limits_serve_a_plain_lora(fake):
    check_servable(fake.make_manifest("a", targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj")))


def test_rank_above_the_limit(fake):
    with pytest.raises(NotServableError) as info:
        check_servable(fake.make_manifest("big", rank=32), ServingLimits(max_rank=16))
    msg = str(info.value)
    assert "'big'" in msg and "rank 32 is above the server's limit 16" in msg
    assert "manifest.json" not in msg  # a bare manifest has no path to name
    check_servable(fake.make_manifest("big", rank=32), ServingLimits(max_rank=32))


def test_unservable_target_modules(fake):
    with pytest.raises(NotServableError, match=r"target modules \['lm_head'\]"):
        check_servable(fake.make_manifest("a", targets=("q_proj", "lm_head")))


@pytest.mark.parametrize("config, words", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"modules_to_save": ["score"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "biases"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"rank_pattern": {"q_proj": 64}}, "rank 64"),
    ({"target_modules": ["q_proj", "fc1"]}, "fc1"),
    ({"use_qalora": True}, "QALoRA"),
])
def test_config_features_vllm_refuses(fake, config, words):
    manifest = fake.make_manifest("a")
    with pytest.raises(NotServableError, match=words) as info:
        check_servable(manifest, config={"r": 8, "target_modules": ["q_proj"]} | config)
    assert "Fix:" in str(info.value)


def test_rslora_and_plain_inits_are_servable(fake):
    check_servable(fake.make_manifest("a"), config={"r": 8, "use_rslora": True,
                                                    "init_lora_weights": "gaussian"})


def test_all_reasons_are_reported_at_once(fake):
    with pytest.raises(NotServableError) as info:
        check_servable(fake.make_manifest("a", rank=64), config={"r": 64, "use_dora": True})
    assert "rank 64" in str(info.value) and "DoRA" in str(info.value)


def test_importing_the_store_stays_light():
    code = ("import sys, lorastack.adapters.store, lorastack.adapters.cli; "
            "print(sorted(m for m in ('torch', 'numpy', 'safetensors', 'vllm', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_examples_round_trip_and_must_be_strings(fake):
    manifest = fake.make_manifest("reviews", examples=("good stuff", "awful"))
    assert AdapterManifest.from_json(manifest.to_json()).examples == ("good stuff", "awful")
    with pytest.raises(ManifestError, match="examples: must be a list of strings"):
        manifest.replace(examples=(1, 2))


# manifest.json as lorastack wrote it when the manifest was a dataclass (format_version 1)
WRITTEN_BEFORE = {
    "base_fingerprint": "sha256:" + "ab" * 32, "base_model": "smollm2-135m",
    "chat_format": "<|user|>{input}<|assistant|>", "created_at": "2026-12-01T17:47:18+00:00",
    "data_fingerprint": "", "end_of_turn": "<|end|>", "examples": ["great"],
    "format_version": 1, "label_words": {"positive": " good"}, "labels": ["negative", "positive"],
    "lora": {"alpha": 16.0, "dropout": 0.05, "rank": 8, "target_modules": ["q_proj", "v_proj"],
             "use_dora": False, "use_rslora": False},
    "metrics": {"test": {"n": 3.0}, "validation": {"accuracy": 0.8}}, "name": "reviews",
    "prompt_template": "Review: {text}", "score_end_of_turn": False, "task": "classification",
    "training": {"lora": {"r": 8}}, "versions": {"peft": "0.21.2"}}


def test_a_manifest_written_before_reads_and_is_written_back_byte_for_byte():
    text = json.dumps(WRITTEN_BEFORE, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    manifest = AdapterManifest.from_json(text)
    assert manifest.lora.target_modules == ("q_proj", "v_proj") and manifest.examples == ("great",)
    assert manifest.label_word("positive") == " good" and manifest.metrics.test == {"n": 3.0}
    assert manifest.to_json() == text


def test_the_manifest_is_frozen_and_replace_checks_the_change(fake):
    manifest = fake.make_manifest("a")
    with pytest.raises(ValueError, match="frozen"):
        manifest.name = "b"
    renamed = manifest.replace(name="b")
    assert renamed.name == "b" and renamed.created_at == manifest.created_at
    assert renamed.replace(name="a") == manifest and renamed.lora is manifest.lora
    with pytest.raises(InvalidNameError):
        manifest.replace(name="../b")
    with pytest.raises(ManifestError, match="lora.rank"):
        manifest.lora.replace(rank=0)
    with pytest.raises(ManifestError, match="at least two"):
        manifest.replace(labels=("one",))


def test_one_servability_rule_for_settings_and_adapters():
    assert unservable_lora(16, ["model.layers.0.self_attn.q_proj", "v_proj"], False) == {}
    assert unservable_lora(32, ["q_proj", "lm_head", "fc1"], True, ServingLimits(max_rank=16)) \
        == {"rank": 32, "target_modules": ["fc1", "lm_head"], "use_dora": True}
    assert unservable_lora(32, [], False, ServingLimits(max_rank=32)) == {}


def test_a_calibrated_manifest_writes_and_reads_its_temperature():
    manifest = AdapterManifest.from_json(json.dumps(WRITTEN_BEFORE))
    assert manifest.temperature == 1.0 and "temperature" not in manifest.to_dict()
    hot = manifest.replace(temperature=0.45)
    assert hot.to_dict()["temperature"] == 0.45
    assert AdapterManifest.from_json(hot.to_json()).temperature == 0.45
    with pytest.raises(ManifestError, match="temperature"):
        manifest.replace(temperature=0.0)


def test_a_label_bias_is_written_checked_and_applied_with_the_temperature():
    manifest = AdapterManifest.from_json(json.dumps(WRITTEN_BEFORE))
    assert manifest.label_bias == {} and "label_bias" not in manifest.to_dict()
    shifted = manifest.replace(label_bias={"positive": 1.5}, temperature=0.5)
    assert AdapterManifest.from_json(shifted.to_json()).label_bias == {"positive": 1.5}
    scores = {"negative": -1.0, "positive": -2.0}
    assert shifted.probabilities(scores) == pytest.approx(
        label_scoring.probabilities({"negative": -1.0, "positive": -0.5}, 0.5))
    with pytest.raises(ManifestError, match="label_bias keys must be labels"):
        manifest.replace(label_bias={"mixed": 1.0})
    with pytest.raises(ManifestError, match="finite"):
        manifest.replace(label_bias={"positive": float("inf")})
