"""The adapter store: writing, reading with explanations, listing, the change feed, importing;
under contention: test_store_atomic.py."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import pytest

from lorastack.adapters.files import read_safetensors_header, write_adapter
from lorastack.adapters.manifest import (
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    BaseMismatchError,
    InvalidNameError,
    ManifestError,
    MissingFileError,
    NotServableError,
    ServingLimits,
    UnknownFormatVersionError,
    UnsafeWeightsError,
    check_servable,
)
from lorastack.adapters.store import AdapterStore, Change, default_store_root

pytestmark = pytest.mark.usefixtures("store_env")


def explains(exc: AdapterError, adapter: str, file: str, fix: str) -> None:
    """The message names the adapter, the file and the fix."""
    msg = str(exc)
    assert f"adapter {adapter!r}" in msg, msg
    assert file in msg, msg
    assert "Fix:" in msg and fix in msg, msg


# -- writing and reading ---------------------------------------------------------------------

def test_round_trip_keeps_peft_files_byte_for_byte(store, tmp_path, fake):
    src = fake.write_peft_dir(tmp_path / "out")
    manifest = fake.make_manifest("reviews")
    written = write_adapter(store.root, "reviews", src, manifest)
    assert sorted(p.name for p in written.path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (written.path / name).read_bytes() == (src / name).read_bytes()
    read = store.resolve("reviews", base_fingerprint=fake.FINGERPRINT)
    assert read.manifest == manifest and read.config["r"] == 8
    assert read.weights_bytes == (src / "adapter_model.safetensors").stat().st_size
    assert read.content_hash().startswith("sha256:")
    assert [a.name for a in store.list()] == ["reviews"] and store.problems() == []


def test_write_accepts_a_mapping_of_files(store, tmp_path, fake):
    src = fake.write_peft_dir(tmp_path / "out")
    sources = {"adapter_config.json": src / "adapter_config.json",
               "adapter_model.safetensors": src / "adapter_model.safetensors"}
    assert store.write("m", sources, fake.make_manifest("m")).name == "m"


def test_list_is_sorted_and_reports_invalid_entries_apart(store, add_adapter):
    for name in ("zeta", "alpha", "mid"):
        add_adapter(name)
    (store.root / "broken").mkdir()
    shutil.copytree(store.root / "mid", store.root / "bad name")
    assert [a.name for a in store.list()] == ["alpha", "mid", "zeta"]
    problems = {p.name: p for p in store.problems()}
    assert set(problems) == {"bad name", "broken"}
    assert isinstance(problems["broken"].error, MissingFileError)
    assert isinstance(problems["bad name"].error, InvalidNameError)


def test_second_writer_of_a_name_fails_unless_replace(store, add_adapter, tmp_path, fake):
    first = add_adapter("dup")
    src = fake.write_peft_dir(tmp_path / "second", rank=4)
    with pytest.raises(AdapterExistsError) as info:
        store.write("dup", src, fake.make_manifest("dup", rank=4))
    explains(info.value, "dup", str(first.path), "replace")
    assert store.resolve("dup").manifest.lora.rank == 8
    store.write("dup", src, fake.make_manifest("dup", rank=4), replace=True)
    assert store.resolve("dup").manifest.lora.rank == 4
    assert os.listdir(store.root) == ["dup", ".lock"] or sorted(os.listdir(store.root)) == [
        ".lock", "dup"]


def test_manifest_name_must_match(store, tmp_path, fake):
    src = fake.write_peft_dir(tmp_path / "out")
    with pytest.raises(ManifestError, match="names the adapter 'other'"):
        store.write("mine", src, fake.make_manifest("other"))


def test_remove(store, add_adapter):
    add_adapter("gone")
    store.remove("gone")
    assert store.list() == [] and not any(n.endswith(".removed") for n in os.listdir(store.root))
    with pytest.raises(AdapterNotFoundError):
        store.remove("gone")


def test_not_found_lists_the_available_names(store, add_adapter):
    add_adapter("one")
    add_adapter("two")
    with pytest.raises(AdapterNotFoundError) as info:
        store.resolve("three")
    explains(info.value, "three", str(store.root), "lorastack adapters list")
    assert "available: one, two" in str(info.value)


def test_bad_names_are_refused_before_touching_disk(store):
    for name in ("../escape", "a/b", "..", "x" * 65):
        with pytest.raises(InvalidNameError):
            store.resolve(name)
        with pytest.raises(InvalidNameError):
            store.remove(name)
    assert not store.root.exists()


def test_default_root_follows_the_environment(store_env, tmp_path, monkeypatch):
    assert default_store_root() == store_env / "adapters"
    monkeypatch.setenv("LORASTACK_STORE", str(tmp_path / "elsewhere"))
    assert AdapterStore().root == tmp_path / "elsewhere"


# -- refusals when reading -------------------------------------------------------------------

def _edit(store, name, file, text):
    (store.root / name / file).write_text(text)


def test_missing_files_are_named(store, add_adapter):
    for file, fix in (("manifest.json", "lorastack adapters import"),
                      ("adapter_config.json", "adapter_config.json back"),
                      ("adapter_model.safetensors", "re-export")):
        add_adapter("a")
        (store.root / "a" / file).unlink()
        with pytest.raises(MissingFileError) as info:
            store.resolve("a")
        explains(info.value, "a", f"a/{file}", fix)
        store.remove("a")


def test_manifest_that_does_not_parse(store, add_adapter):
    add_adapter("a")
    _edit(store, "a", "manifest.json", "{ not json")
    with pytest.raises(ManifestError) as info:
        store.resolve("a")
    explains(info.value, "a", "a/manifest.json", "re-export")
    assert "not valid JSON" in str(info.value)


def test_manifest_with_unknown_format_version(store, add_adapter):
    add_adapter("a")
    data = json.loads((store.root / "a" / "manifest.json").read_text())
    _edit(store, "a", "manifest.json", json.dumps(data | {"format_version": 99}))
    with pytest.raises(UnknownFormatVersionError) as info:
        store.resolve("a")
    explains(info.value, "a", "a/manifest.json", "upgrade lorastack")


def test_manifest_with_a_bad_field_or_another_name(store, add_adapter):
    add_adapter("a")
    path = store.root / "a" / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"task": "regression"}))
    with pytest.raises(ManifestError, match="task: must be one of") as info:
        store.resolve("a")
    explains(info.value, "a", "a/manifest.json", "correct the field")
    path.write_text(json.dumps(data | {"name": "b"}))
    with pytest.raises(ManifestError, match="names the adapter 'b'") as info:
        store.resolve("a")
    explains(info.value, "a", "a/manifest.json", "rename")


def test_config_that_disagrees_or_is_not_lora(store, add_adapter):
    add_adapter("a")
    path = store.root / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"r": 16}))
    with pytest.raises(ManifestError, match="rank 8") as info:
        store.resolve("a")
    explains(info.value, "a", "a/adapter_config.json", "re-export")
    path.write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(ManifestError, match="only LoRA") as info:
        store.resolve("a")
    explains(info.value, "a", "a/adapter_config.json", "LoraConfig")


@pytest.mark.parametrize("pickle_name", ["adapter_model.bin", "adapter_model.pt", "state.pkl"])
def test_pickle_files_are_refused_and_never_loaded(store, add_adapter, pickle_name):
    add_adapter("a")
    (store.root / "a" / pickle_name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeWeightsError) as info:
        store.resolve("a")
    explains(info.value, "a", pickle_name, "safe_serialization=True")
    assert [p.name for p in store.problems()] == ["a"]


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:-4], "truncated"),
    (lambda b: b[:4], "only 4 bytes"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], "header length"),
    (lambda b: b[:8] + b"[" + b[9:], "not JSON"),
    (lambda b: b + b"\0" * 8, "padded"),
])
def test_malformed_safetensors_are_refused(store, add_adapter, damage, words):
    add_adapter("a")
    weights = store.root / "a" / "adapter_model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(UnsafeWeightsError, match=words) as info:
        store.resolve("a")
    explains(info.value, "a", "a/adapter_model.safetensors", "safetensors")


def test_bad_tensor_entry(tmp_path, fake):
    path = fake.write_safetensors(tmp_path / "w.safetensors", {"x.lora_A.weight": ("F32", [2, 2])})
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["x.lora_A.weight"]["dtype"] = "F99"
    text = json.dumps(header).encode().ljust(length)
    path.write_bytes(raw[:8] + text + raw[8 + length:])
    with pytest.raises(UnsafeWeightsError, match="bad entry"):
        read_safetensors_header(path, "x")


def test_base_fingerprint_mismatch(store, add_adapter, fake):
    add_adapter("a")
    with pytest.raises(BaseMismatchError) as info:
        store.resolve("a", base_fingerprint=fake.OTHER_FINGERPRINT)
    explains(info.value, "a", "a/manifest.json", "retrain it on this base")
    assert "abababababab" in str(info.value) and "cdcdcdcdcdcd" in str(info.value)


def test_serving_checks_read_the_config_vllm_reads(store, add_adapter):
    add_adapter("big", rank=32)
    with pytest.raises(NotServableError) as info:
        check_servable(store.resolve("big"), ServingLimits(max_rank=16))
    explains(info.value, "big", "big/adapter_config.json", "rank <= 16")
    add_adapter("saves", config={"modules_to_save": ["lm_head"]})
    with pytest.raises(NotServableError, match="modules_to_save") as info:
        check_servable(store.resolve("saves"))
    explains(info.value, "saves", "saves/adapter_config.json", "without modules_to_save")
    add_adapter("embed", targets=("q_proj", "embed_tokens"))
    with pytest.raises(NotServableError, match="embed_tokens"):
        check_servable(store.resolve("embed"))


# -- a big store and the change feed ---------------------------------------------------------

def test_listing_a_thousand_adapters_reads_no_weights(store, add_adapter):
    first = add_adapter("a0000")
    manifest = json.loads((first.path / "manifest.json").read_text())
    for i in range(1, 1000):  # hard links: quick to make, and one write below damages all
        path = store.root / f"a{i:04d}"
        path.mkdir()
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(first.path / file, path / file)
        (path / "manifest.json").write_text(json.dumps(manifest | {"name": path.name}))
    (first.path / "adapter_model.safetensors").write_bytes(b"garbage: unreadable as weights")

    started = time.perf_counter()
    adapters = store.list()
    took = time.perf_counter() - started
    print(f"listing 1000 adapters took {took * 1000:.0f} ms")
    assert len(adapters) == 1000 and adapters[0].name == "a0000" and adapters[-1].name == "a0999"
    with pytest.raises(UnsafeWeightsError):  # resolve() does read them
        store.resolve("a0500")

    events, token = store.changes()
    assert len(events) == 1000 and {e.event for e in events} == {"added"}
    assert store.changes(token) == ([], token)


def test_change_feed_reports_added_changed_removed(store, add_adapter, tmp_path, fake):
    events, token = store.changes()
    assert events == []
    add_adapter("one")
    add_adapter("two")
    events, token = store.changes(token)
    assert events == [Change("added", "one"), Change("added", "two")]
    src = fake.write_peft_dir(tmp_path / "v2", rank=4)
    store.write("one", src, fake.make_manifest("one", rank=4), replace=True)
    store.remove("two")
    add_adapter("three")
    events, token = store.changes(token)
    assert events == [Change("changed", "one"), Change("added", "three"),
                      Change("removed", "two")]
    assert store.changes(token)[0] == []
    (store.root / ".x.1234.partial").mkdir()  # a write in progress is not an event
    (store.root / "no-manifest").mkdir()
    assert store.changes(token)[0] == []


# -- importing an external PEFT directory --------------------------------------------------

def test_import_a_peft_directory(store, tmp_path, fake, fake_base):
    src = fake.write_peft_dir(tmp_path / "external", rank=4, targets=("q_proj", "o_proj"),
                              use_rslora=True)
    adapter = store.import_dir(src, "ext", "classification", labels=["no", "yes"], base=fake_base,
                               prompt_template="Q: {text}\nA:")
    m = adapter.manifest
    assert (m.lora.rank, m.lora.alpha, m.lora.use_rslora) == (4, 8, True)
    assert m.lora.target_modules == ("q_proj", "o_proj")
    assert m.base_fingerprint == fake.FINGERPRINT and m.labels == ("no", "yes")
    assert m.training["imported_from"] == str(src.resolve())
    assert not (adapter.path / "README.md").exists()
    assert store.resolve("ext", base_fingerprint=fake_base.fingerprint).manifest == m


def test_import_takes_target_modules_from_the_weights_when_config_has_a_pattern(
        store, tmp_path, fake, fake_base):
    src = fake.write_peft_dir(tmp_path / "external", targets=("q_proj", "down_proj"))
    config = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps(config | {"target_modules":
                                                                   "all-linear"}))
    adapter = store.import_dir(src, "pat", "generation", base=fake_base)
    assert adapter.manifest.lora.target_modules == ("down_proj", "q_proj")


def test_import_refuses_pickle_weights(store, tmp_path, fake, fake_base):
    src = fake.write_peft_dir(tmp_path / "external")
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    with pytest.raises(UnsafeWeightsError) as info:
        store.import_dir(src, "pickled", "generation", base=fake_base)
    explains(info.value, "pickled", "adapter_model.bin", "safe_serialization=True")
    assert not store.root.exists() or store.list() == []


def test_import_explains_bad_options_and_missing_base(store, tmp_path, fake, fake_base):
    src = fake.write_peft_dir(tmp_path / "external")
    with pytest.raises(ManifestError, match="at least two") as info:
        store.import_dir(src, "x", "classification", labels=["one"], base=fake_base)
    assert "--labels" in str(info.value)
    with pytest.raises(AdapterError) as info:
        store.import_dir(src, "x", "generation", base="smollm2-135m")  # not cached here
    explains(info.value, "x", "", "lorastack models pull smollm2-135m")
