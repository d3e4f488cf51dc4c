"""The adapter store: a directory of adapter directories, one per name.

    <root>/<name>/...                   a whole adapter (see files.py)
    <root>/.<name>.<id>.partial         a write in progress (or one that crashed): never listed
    <root>/.<name>.<id>.replaced|removed  an old copy being deleted: never listed
    <root>/.lock                        serialises check-then-rename steps between writers

The trainer writes here, the server reads here and polls `changes()` to notice adapters that
appear, change or go. Root: the `root` argument, else $LORASTACK_STORE, else
$LORASTACK_HOME/adapters.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from lorastack import __version__
from lorastack.adapters.files import (
    CONFIG_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Adapter,
    lora_tensor_info,
    move_aside,
    read_adapter,
    read_config,
    read_safetensors_header,
    source_files,
    store_lock,
    write_adapter,
)
from lorastack.adapters.home import lorastack_home
from lorastack.adapters.manifest import (
    AdapterError,
    AdapterManifest,
    AdapterNotFoundError,
    LoraSettings,
    ManifestError,
    Metrics,
    MissingFileError,
    ServingLimits,
    check_name,
    check_servable,
    short_hash,
)
from lorastack.adapters.models import DEFAULT_BASE, BaseModel, ModelError, resolve_base

STORE_ENV = "LORASTACK_STORE"
# Hidden entries of writes (files.py): in progress, or left by a crash when this old.
LEFTOVERS, LEFTOVER_AGE_S = (".partial", ".replaced", ".removed"), 3600.0

# name -> (inode, mtime_ns, size) of its manifest.json. Every write makes a new manifest file,
# so a replaced adapter changes inode even when the bytes and mtime happen to match.
StoreSnapshot = dict[str, tuple[int, int, int]]


class Change(NamedTuple):
    event: str  # "added" | "changed" | "removed"
    name: str


@dataclass(frozen=True)
class AdapterProblem:
    """An entry of the store that is not a valid adapter, and why."""

    name: str
    path: Path
    error: AdapterError

    @property
    def message(self) -> str:
        return str(self.error)


def default_store_root() -> Path:
    raw = os.environ.get(STORE_ENV, "").strip()
    return Path(raw).expanduser() if raw else lorastack_home() / "adapters"


class AdapterStore:
    """The adapters under `root`; every method validates names and explains refusals."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root else default_store_root()

    def __repr__(self) -> str:
        return f"AdapterStore({str(self.root)!r})"

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        """Names of the entries that look like adapters (not checked), sorted."""
        return sorted(self._entries())

    # -- reading ---------------------------------------------------------------------------

    def scan(self) -> tuple[list[Adapter], list[AdapterProblem]]:
        """(valid adapters, problems), both sorted by name; reads only the JSON files."""
        adapters, problems = [], []
        for name in self.names():
            try:
                adapter = _read_settled(self.root / name, check_weights=False)
            except AdapterError as exc:
                problems.append(AdapterProblem(name, self.root / name, exc))
                continue
            if adapter is not None:  # None: removed while we looked
                adapters.append(adapter)
        return adapters, problems

    def list(self) -> list[Adapter]:
        """The valid adapters, sorted by name (see problems() for the rest).

        Cheap: reads manifest.json and adapter_config.json of each, never the weights;
        resolve() checks an adapter fully before anyone loads it.
        """
        return self.scan()[0]

    def problems(self) -> builtins.list[AdapterProblem]:
        """Entries that are not valid adapters, each with the error that says what to fix."""
        return self.scan()[1]

    def resolve(self, name: str, *, base_fingerprint: str | None = None) -> Adapter:
        """Read adapter `name`, fully checked (weights included); with `base_fingerprint`, also
        refuse an adapter trained on another base."""
        path = self.path(name)
        adapter = _read_settled(path, base_fingerprint=base_fingerprint)
        if adapter is None:
            raise self._not_found(name, [a.name for a in self.list()])
        return adapter

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    # -- writing ---------------------------------------------------------------------------

    def write(self, name: str, source: Any, manifest: AdapterManifest,
              replace: bool = False) -> Adapter:
        """Write an adapter atomically (see files.write_adapter). Every write first deletes the
        leftovers of crashed writes, if any is old enough (see clean_leftovers)."""
        with contextlib.suppress(OSError):  # tidying up never stops a write
            self.clean_leftovers()
        return write_adapter(self, name, source, manifest, replace=replace)

    def copy(self, name: str, new_name: str, into: AdapterStore | None = None,
             replace: bool = False, **changes: Any) -> Adapter:
        """Adapter `name`'s weights as a new adapter `new_name`, in this store or `into`
        another: the same files, the manifest renamed (and given the `changes`, such as
        training=... or metrics=...); checked like any write."""
        adapter = self.resolve(name)
        return (into or self).write(new_name, adapter.path, adapter.manifest.replace(
            name=new_name, **changes), replace=replace)

    def remove(self, name: str) -> None:
        """Delete adapter `name`: renamed aside under the lock (so it vanishes at once), then
        deleted."""
        path = self.path(name)
        with store_lock(self.root):
            if not os.path.lexists(path):
                raise self._not_found(name, self.names())
            aside = move_aside(path, "removed")
        shutil.rmtree(aside, ignore_errors=True)

    def import_dir(self, src: str | Path, name: str, task: str, labels: Iterable[str] = (),
                   base: str | BaseModel = DEFAULT_BASE, prompt_template: str = "{text}",
                   label_words: dict[str, str] | None = None, metrics: Metrics | None = None,
                   replace: bool = False) -> Adapter:
        """Copy an external PEFT LoRA directory into the store, writing its manifest.

        `base`: the base model it was trained on (alias, hub id, directory, or a resolved
        BaseModel); it must be available locally, because the manifest records its fingerprint.
        Pickle weights are refused; only the safetensors weights and the config are copied.
        """
        check_name(name)
        src = Path(src).expanduser()
        config_src, weights_src = source_files(src, name)
        config = read_config(config_src, name)
        header = read_safetensors_header(weights_src, name)
        _, weight_modules = lora_tensor_info(header)
        targets = config.get("target_modules")
        if not isinstance(targets, list):  # a regex or "all-linear": the weights say which
            targets = sorted(weight_modules)
        base_model = base if isinstance(base, BaseModel) else _resolve_base(base, name)
        try:
            manifest = AdapterManifest(
                name=name, task=task, base_model=base_model.name,
                base_fingerprint=base_model.fingerprint,
                lora=LoraSettings(rank=config["r"], alpha=config.get("lora_alpha", 8),
                                  target_modules=targets, dropout=config.get("lora_dropout") or 0.0,
                                  use_dora=bool(config.get("use_dora")),
                                  use_rslora=bool(config.get("use_rslora"))),
                prompt_template=prompt_template, labels=tuple(labels),
                label_words=dict(label_words or {}), metrics=metrics or Metrics(),
                training={"imported_from": str(src.resolve()),
                          "peft_base_model": config.get("base_model_name_or_path")},
                versions={"lorastack": __version__,
                          **({"peft": config["peft_version"]} if config.get("peft_version")
                             else {})})
        except ManifestError as exc:
            raise exc.located(name, src / CONFIG_FILE if "lora." in exc.problem else None,
                              "check the import options (--task, --labels, --template)") from None
        return self.write(name, {CONFIG_FILE: config_src, WEIGHTS_FILE: weights_src},
                          manifest, replace=replace)

    # -- noticing changes ------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        """name -> manifest stamp, for every entry with a manifest: one stat per adapter."""
        snap: StoreSnapshot = {}
        for name in self._entries():
            try:
                check_name(name)
                st = os.stat(self.root / name / MANIFEST_FILE)
            except (AdapterError, OSError):  # not plain (scan() reports it; nothing serves it)
                continue  # or not an adapter (yet): no manifest
            snap[name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return snap

    def changes(self, since: StoreSnapshot | None = None
                ) -> tuple[builtins.list[Change], StoreSnapshot]:
        """What changed since the snapshot `since` (None: the empty store), and the new snapshot.

        Poll it: `events, token = store.changes(token)`. Events are sorted by name; an event says
        only that the files changed: resolve() the name to check it before loading it.
        """
        since = since or {}
        now = self.snapshot()
        events = [Change("removed", n) for n in since if n not in now]
        for name, stamp in now.items():
            if name not in since:
                events.append(Change("added", name))
            elif since[name] != stamp:
                events.append(Change("changed", name))
        events.sort(key=lambda c: (c.name, c.event))
        return events, now

    def clean_leftovers(self, min_age_s: float = LEFTOVER_AGE_S) -> builtins.list[Path]:
        """Delete the hidden leftovers of crashed writes (write() calls it) older than
        `min_age_s`, and return them. Younger ones may be a write's in progress; a rename makes
        one young (ctime), so a write can still put back the copy it moved aside."""
        removed: builtins.list[Path] = []
        cutoff = time.time() - min_age_s
        for entry in self._scan():
            if entry.name.startswith(".") and entry.name.endswith(LEFTOVERS) and entry.is_dir(
                    follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):  # deleted meanwhile by its writer
                    st = entry.stat(follow_symlinks=False)
                    if max(st.st_mtime, st.st_ctime) < cutoff:
                        shutil.rmtree(entry.path, ignore_errors=True)
                        removed.append(Path(entry.path))
        return removed

    def _not_found(self, name: str, available: Iterable[str]) -> AdapterNotFoundError:
        return AdapterNotFoundError(
            f"no adapter of this name in the store (available: {', '.join(available) or 'none'})",
            name, self.root, "check the name with `lorastack adapters list`, or pass the right "
            "store (--store / LORASTACK_STORE)")

    def _entries(self) -> Iterable[str]:
        """Names of visible subdirectories; hidden ones are writes in progress or leftovers."""
        return [e.name for e in self._scan() if not e.name.startswith(".") and e.is_dir()]

    def _scan(self) -> builtins.list[os.DirEntry[str]]:
        try:
            return list(os.scandir(self.root))
        except FileNotFoundError:
            return []


def _read_settled(path: Path, **kwargs: Any) -> Adapter | None:
    """read_adapter(path), or None when there is no such directory.

    A file missing because the directory was renamed away mid-read (a replace or a remove by
    another process) is not a broken adapter: read again, or report it gone.
    """
    for _ in range(5):
        try:
            inode = os.stat(path).st_ino
        except FileNotFoundError:
            return None
        try:
            return read_adapter(path, **kwargs)
        except MissingFileError:
            try:
                settled = os.stat(path).st_ino == inode
            except FileNotFoundError:
                settled = False
            if settled:
                raise
    return read_adapter(path, **kwargs)


def _resolve_base(base: str, name: str) -> BaseModel:
    try:
        return resolve_base(base, fetch=False)
    except ModelError as exc:
        raise AdapterError(f"cannot fingerprint its base model {base!r}: {exc}", name, None,
                           f"run `lorastack models pull {base}` first, or pass the base "
                           f"model's directory") from None


def version_id(adapter: Adapter) -> str:
    """`<name>@<first 16 hex of its content hash>`: one version of an adapter, as the gateway
    and the vLLM resolver name it to vLLM (which must never see one name for two weights)."""
    return f"{adapter.name}@{short_hash(adapter.content_hash(), 16)}"


def pin(adapter: Adapter, into: Path, *, base_fingerprint: str,
        limits: ServingLimits | None = None) -> Adapter:
    """A private, immutable copy of `adapter` at `into`/<name>@<digest>/<name>, checked again
    after the copy (base, servability), for a server to load: the store's directory may be
    replaced at any time, and vLLM may re-read the path later. Idempotent per version: a
    version pinned before is checked again and returned without a second copy."""
    name = adapter.name
    pinned = into / version_id(adapter) / name
    if pinned.is_dir():  # this version was pinned before: check it for this caller, no copy
        copy = read_adapter(pinned, base_fingerprint=base_fingerprint)
        check_servable(copy, limits)
        return copy
    into.mkdir(parents=True, exist_ok=True)
    tmp = into / f".{name}.{uuid.uuid4().hex[:8]}.partial" / name
    tmp.mkdir(parents=True)
    try:
        copy_consistent(adapter.path, tmp)
        copy = read_adapter(tmp, base_fingerprint=base_fingerprint)
        check_servable(copy, limits)
        final = into / version_id(copy)
        if not final.exists():
            try:
                os.rename(tmp.parent, final)
            except OSError:  # pinned by another thread or process meanwhile: same bytes
                if not final.is_dir():
                    raise
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return read_adapter(final / name)


def copy_consistent(src: Path, dst: Path) -> None:
    """Copy the adapter's files through one directory handle, so that all three come from the
    same version even if a writer renames a replacement into `src` meanwhile."""
    dir_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for file in (MANIFEST_FILE, CONFIG_FILE, WEIGHTS_FILE):
            fd = os.open(file, os.O_RDONLY, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as fin, open(dst / file, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
    finally:
        os.close(dir_fd)
