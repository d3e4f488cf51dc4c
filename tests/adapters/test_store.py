"""The adapter store: writing atomically, reading with explanations, listing, the change feed."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from lorastack.adapters import files
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


# -- atomicity and concurrency -------------------------------------------------------------

def _write_contested(root, src, manifest, barrier, results, replace=False) -> None:
    barrier.wait()
    try:
        write_adapter(root, "contested", src, manifest, replace=replace)
        results.put(("won", manifest.training["writer"]))
    except AdapterExistsError:
        results.put(("exists", manifest.training["writer"]))
    except Exception as exc:  # noqa: BLE001  (reported, so that the test fails with the reason)
        results.put(("error", repr(exc)))


def _contenders(tmp_path, fake, count):
    for i in range(count):
        src = fake.write_peft_dir(tmp_path / f"src{i}", rank=i + 1)
        yield src, fake.make_manifest("contested", rank=i + 1, training={"writer": i})


def test_concurrent_processes_writing_one_name_one_wins(store, tmp_path, fake):
    ctx = multiprocessing.get_context("fork")
    count = 6
    barrier, results = ctx.Barrier(count), ctx.Queue()
    procs = [ctx.Process(target=_write_contested, args=(store.root, src, m, barrier, results))
             for src, m in _contenders(tmp_path, fake, count)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert not [o for o in outcomes if o[0] == "error"], outcomes
    winners = [i for kind, i in outcomes if kind == "won"]
    assert len(winners) == 1 and len(outcomes) == count
    adapter = store.resolve("contested")  # complete: every file checked, weights included
    assert adapter.manifest.training["writer"] == winners[0]
    assert adapter.config["r"] == winners[0] + 1
    assert [a.name for a in store.list()] == ["contested"]
    assert sorted(os.listdir(store.root)) == [".lock", "contested"]  # no partial left behind


def test_concurrent_threads_writing_one_name_one_wins(store, tmp_path, fake):
    import queue
    count = 8
    barrier, results = threading.Barrier(count), queue.Queue()
    with ThreadPoolExecutor(count) as pool:
        for src, m in _contenders(tmp_path, fake, count):
            pool.submit(_write_contested, store.root, src, m, barrier, results)
    outcomes = [results.get_nowait() for _ in range(count)]
    assert sorted(kind for kind, _ in outcomes) == ["exists"] * (count - 1) + ["won"]


def test_readers_never_see_half_an_adapter_while_it_is_replaced(store, tmp_path, fake):
    contenders = list(_contenders(tmp_path, fake, 4))
    store.write("contested", *contenders[0])
    stop, seen, bad = threading.Event(), [], []

    def read_loop():
        while not stop.is_set():
            try:
                adapter = store.resolve("contested")
                assert adapter.config["r"] == adapter.manifest.lora.rank
                seen.append(adapter.manifest.lora.rank)
            except AdapterNotFoundError:
                seen.append(None)  # the instant between renaming the old out and the new in
            except Exception as exc:  # noqa: BLE001  (collected, asserted below)
                bad.append(exc)
            listed = store.list()
            if len(listed) > 1 or store.problems():
                bad.append(("listing", listed, store.problems()))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for round_ in range(40):
            store.write("contested", *contenders[round_ % 4], replace=True)
    finally:
        stop.set()
        reader.join()
    assert not bad, bad[:3]
    assert seen


def test_a_failure_inside_the_write_leaves_nothing(store, tmp_path, fake, monkeypatch):
    src = fake.write_peft_dir(tmp_path / "out")

    def fail(path):  # called on each staged file once it is copied
        raise OSError("disk full")

    monkeypatch.setattr(files, "_fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        store.write("crashy", src, fake.make_manifest("crashy"))
    assert store.list() == [] and store.problems() == []
    assert [n for n in os.listdir(store.root) if n != ".lock"] == []


def _die_mid_write(root, src, manifest) -> None:
    files._fsync = lambda path: os._exit(3)  # dies with files staged; no cleanup runs
    write_adapter(root, "killed", src, manifest)


def test_a_process_killed_mid_write_leaves_no_listed_adapter(store, tmp_path, fake):
    src = fake.write_peft_dir(tmp_path / "out")
    proc = multiprocessing.get_context("fork").Process(
        target=_die_mid_write, args=(store.root, src, fake.make_manifest("killed")))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 3
    leftovers = [n for n in os.listdir(store.root) if n.endswith(".partial")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".killed.")
    assert store.list() == [] and store.problems() == [] and store.names() == []
    assert store.changes()[0] == []
    with pytest.raises(AdapterNotFoundError):
        store.resolve("killed")
    assert store.clean_leftovers(min_age_s=3600) == []  # young: maybe a write in progress
    assert [p.name for p in store.clean_leftovers(min_age_s=0)] == leftovers
    store.write("killed", src, fake.make_manifest("killed"))  # the name is free
    assert [a.name for a in store.list()] == ["killed"]



def test_a_write_deletes_old_leftovers_and_keeps_young_ones(store, add_adapter, monkeypatch):
    from lorastack.adapters import store as store_module

    add_adapter("a")
    leftovers = [store.root / n for n in (".x.1a2b3c4d.partial", ".a.5e6f7a8b.replaced",
                                          ".b.9c0d1e2f.removed")]
    for path in leftovers:
        (path / "sub").mkdir(parents=True)
    past = time.time() - 7200  # an old mtime, but a fresh ctime: just moved aside, maybe
    os.utime(leftovers[1], (past, past))  # by a write that may still put it back
    add_adapter("b")
    assert all(p.is_dir() for p in leftovers)  # young: maybe a write in progress
    later = time.time() + 2 * store_module.LEFTOVER_AGE_S
    monkeypatch.setattr(store_module, "time", SimpleNamespace(time=lambda: later))
    add_adapter("c")
    assert not any(os.path.lexists(p) for p in leftovers)
    assert [a.name for a in store.list()] == ["a", "b", "c"]
    assert sorted(os.listdir(store.root)) == [".lock", "a", "b", "c"]


def test_copy_is_the_same_weights_under_another_name(store, add_adapter, tmp_path):
    original = add_adapter("a", examples=("great",))
    copied = store.copy("a", "b")
    assert copied.manifest == original.manifest.replace(name="b") == store.resolve("b").manifest
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (copied.path / file).read_bytes() == (original.path / file).read_bytes()
    elsewhere = AdapterStore(tmp_path / "elsewhere")
    assert store.copy("a", "a", into=elsewhere).path == elsewhere.root / "a"
    assert [a.name for a in elsewhere.list()] == ["a"] and store.names() == ["a", "b"]
    with pytest.raises(AdapterExistsError):
        store.copy("b", "a")
    assert store.copy("b", "a", replace=True).manifest.name == "a"
    with pytest.raises(InvalidNameError):
        store.copy("a", "../c")
    with pytest.raises(AdapterNotFoundError, match="available: a, b"):
        store.copy("nope", "c")

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


def test_pin_gives_every_thread_the_same_checked_copy(store, add_adapter, tmp_path, fake,
                                                      monkeypatch):
    """The gateway's snapshots and the vLLM resolver's copies: one directory per version, even
    when several threads pin the same version at once (the replica's /v1/classify and vLLM's own
    resolution of it)."""
    from lorastack.adapters.store import pin, version_id

    adapter = add_adapter("reviews")
    into = tmp_path / "pinned"
    with ThreadPoolExecutor(8) as pool:
        copies = list(pool.map(lambda _: pin(adapter, into, base_fingerprint=fake.FINGERPRINT),
                               range(16)))
    assert {c.path for c in copies} == {into / version_id(adapter) / "reviews"}
    assert version_id(adapter) == "reviews@" + adapter.content_hash().split(":")[1][:16]
    assert [p.name for p in into.iterdir()] == [version_id(adapter)]  # no partial copies left
    assert copies[0].content_hash() == adapter.content_hash()
    # the race itself: another pinner renamed its copy in between the checks and the rename
    real_exists, real_is_dir = type(into).exists, type(into).is_dir
    monkeypatch.setattr(type(into), "exists", lambda p: False if p.name == version_id(adapter)
                        else real_exists(p))
    monkeypatch.setattr(type(into), "is_dir", lambda p: False if p.parent.name ==
                        version_id(adapter) else real_is_dir(p))
    assert pin(adapter, into, base_fingerprint=fake.FINGERPRINT).path == copies[0].path
    monkeypatch.undo()
    copied = []  # a version pinned before is checked again for each caller, not copied
    monkeypatch.setattr("lorastack.adapters.store.copy_consistent",
                        lambda *a: copied.append(a))
    assert pin(adapter, into, base_fingerprint=fake.FINGERPRINT).path == copies[0].path
    assert copied == []
    with pytest.raises(BaseMismatchError):
        pin(adapter, into, base_fingerprint=fake.OTHER_FINGERPRINT)
    with pytest.raises(NotServableError):
        pin(adapter, into, base_fingerprint=fake.FINGERPRINT, limits=ServingLimits(max_rank=4))
