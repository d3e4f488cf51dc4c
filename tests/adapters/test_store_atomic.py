"""The adapter store under contention: atomic writes, concurrent writers and readers, a
process killed mid-write, leftovers, copies, and pinned versions shared by threads."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from lorastack.adapters import files
from lorastack.adapters.files import write_adapter
from lorastack.adapters.manifest import (
    AdapterExistsError,
    AdapterNotFoundError,
    BaseMismatchError,
    InvalidNameError,
    NotServableError,
    ServingLimits,
)
from lorastack.adapters.store import AdapterStore

pytestmark = pytest.mark.usefixtures("store_env")


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
