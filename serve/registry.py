"""What the gateway serves: the source of truth for which adapter version is loaded where.

vLLM knows an adapter by name and integer id and caches it; its unload drops the name without
freeing the slot (vLLM issues #42633, #54839). So the gateway never reuses a name for other
weights: every adapter version reaches vLLM as `<name>@<content hash>`, loaded from a private,
immutable snapshot of the store's files (vLLM may re-read the path after evicting it from its
own cache, and the store's directory can be replaced at any time).

Rules that keep requests alive across swaps:
- one asyncio lock guards every decision (which version is current, what is loaded where);
  the disk work (validation, snapshot, hashing) runs before it is taken, in a thread;
- a request holds its version (`inflight` count) from before it is sent until its last byte;
- a replaced or removed version is retired: unloaded, and its snapshot deleted, only when its
  last request has finished;
- eviction (over `capacity` adapters on an engine) takes the least recently used version that
  has no request in flight; when every one is busy it loads anyway (vLLM's own cache copes);
- gateways sharing a work dir and engines agree through leases (serve/leases.py): a version
  another gateway holds on an engine is never unloaded there, nor its snapshot deleted, and
  the engine's occupancy counts every gateway's adapters.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorastack.adapters import ensembles
from lorastack.adapters.ensembles import EnsembleManifest
from lorastack.adapters.files import (
    EXPORT_FILE,
    Adapter,
)
from lorastack.adapters.manifest import (
    AdapterError,
    AdapterManifest,
    AdapterNotFoundError,
    ServingLimits,
    check_servable,
    short_hash,
)
from lorastack.adapters.models import BaseModel
from lorastack.adapters.store import AdapterStore, StoreSnapshot, pin, version_id
from lorastack.serve.engine import Engine, EngineError
from lorastack.serve.leases import Leases

log = logging.getLogger("lorastack.serve")


class Superseded(AdapterNotFoundError):
    """add() lost to a remove() (the store's, or an unload by hand) while it prepared the
    adapter: the removal stands."""


class UnknownModelError(LookupError):
    """`model` names neither the base model nor a served adapter (404), or names an ensemble
    where an adapter is needed (400)."""

    status, code = 404, "model_not_found"

    def __init__(self, name: str, available: list[str], hint: str = "") -> None:
        self.name, self.available = name, available
        super().__init__(f"model {name!r} is not served here{hint}. Available: "
                         f"{', '.join(available) or 'none'} (GET /v1/models lists them)")


class EnsembleOnlyClassifies(UnknownModelError):
    status, code = 400, "ensemble_classifies_only"

    def __init__(self, ensemble: EnsembleManifest) -> None:
        self.name, self.available = ensemble.name, []
        LookupError.__init__(self, f"{ensemble.name!r} is an ensemble of "
                             f"{', '.join(ensemble.weights)}: it classifies (POST /v1/classify) "
                             f"and does not generate; send one of its members instead")


@dataclass(eq=False)
class MergedBase:
    """The base model when it is an adapter merged into its base (`lorastack export --merged`):
    /v1/classify scores it as the adapter was trained, from the manifest the export recorded."""

    name: str
    manifest: AdapterManifest
    identity: str  # vLLM's name for it: the base model's
    continuations: dict[str, list[int]] | None = None  # label -> ids, set by serve/scoring.py


def merged_classifier(base: BaseModel) -> MergedBase | None:
    """A MergedBase when the base directory holds a classification adapter's export record."""
    import json

    record = Path(base.path) / EXPORT_FILE
    try:
        manifest = AdapterManifest.model_validate(json.loads(record.read_text())["manifest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not an export, or one without a usable manifest: a plain base
    if manifest.task != "classification":
        return None
    return MergedBase(base.name, manifest, base.name)


@dataclass(eq=False)
class Served:
    """One version of an adapter as the gateway serves it."""

    name: str
    adapter: Adapter  # read from the snapshot, fully checked
    identity: str  # what vLLM knows it as: name@hash
    path: Path  # the snapshot directory vLLM loads
    loaded: dict[Engine, int] = field(default_factory=dict)  # engine -> its generation at load
    inflight: int = 0
    retired: bool = False
    last_used: float = 0.0
    continuations: dict[str, list[int]] | None = None  # label -> ids, set by serve/scoring.py

    @property
    def manifest(self):
        return self.adapter.manifest

    def is_loaded(self, engine: Engine) -> bool:
        return self.loaded.get(engine) == engine.generation


class Registry:
    def __init__(self, store: AdapterStore, base: BaseModel, engines: list[Engine], *,
                 capacity: int, limits: ServingLimits, work_dir: Path,
                 metrics: Any = None, lora: bool = True) -> None:
        self.store, self.base, self.engines, self.lora = store, base, engines, lora
        self.merged = merged_classifier(base)  # the base, when it is a merged classifier
        self.capacity, self.limits, self.metrics = capacity, limits, metrics
        self.snapshots = work_dir / "snapshots"
        self.leases = Leases(work_dir / "leases")
        self.current: dict[str, Served] = {}
        self.draining: list[Served] = []
        self.disabled: set[str] = set()  # unloaded by hand: the watcher leaves them alone
        self.problems: dict[str, str] = {}  # store entries refused, and why
        self.ensembles: dict[str, EnsembleManifest] = {}  # <name>.ensemble.json, read and checked
        self._ensemble_stamps: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._removals: Counter[str] = Counter()  # name -> remove() calls: add() checks it
        self._seen: StoreSnapshot | None = None
        self._rr = 0

    # -- reading ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.current)

    def serves(self, name: str) -> bool:
        """Whether `name` is the base model, a served adapter or a stored ensemble."""
        return name == self.base_name or name in self.current or name in self.ensembles

    def get(self, name: str) -> Served:
        served = self.current.get(name)
        if served is None and name in self.ensembles:
            raise EnsembleOnlyClassifies(self.ensembles[name])
        if served is None:
            hint = (" (an admin unloaded it; POST /v1/adapters/load to serve it again)"
                    if name in self.disabled else "")
            if name in self.problems:
                hint = f" (the store holds it but it was refused: {self.problems[name]})"
            raise UnknownModelError(name, [self.base_name, *self.names()], hint)
        return served

    @property
    def base_name(self) -> str:
        return self.base.name

    def ensemble_members(self, name: str) -> EnsembleManifest | None:
        """The ensemble `name`, with every member served in the version it was fitted with;
        None when `name` is not an ensemble. Raises AdapterError naming a member that is not
        served or changed since the fit."""
        ensemble = self.ensembles.get(name)
        if ensemble is None:
            return None
        for member in ensemble.members:
            served = self.current.get(member.adapter)
            if served is None:
                why = self.problems.get(member.adapter, "it is not in the store or not served")
                raise AdapterError(f"its member {member.adapter!r} cannot be served ({why})",
                                   name, None, "put the member back, or fit the ensemble again "
                                   "with `lorastack ensemble`")
            fitted = short_hash(member.content_hash, 16)  # as version_id names it
            if served.identity.rsplit("@", 1)[-1] != fitted:
                raise AdapterError(f"its member {member.adapter!r} changed after the ensemble "
                                   f"was fitted (it is now {served.identity}, the fit used "
                                   f"{member.adapter}@{fitted})", name, None,
                                   f"fit it again: lorastack ensemble {name} --members "
                                   f"{' '.join(ensemble.weights)} --replace")
        return ensemble

    def live_engines(self) -> list[Engine]:
        return [e for e in self.engines if e.up]

    def pick_engine(self) -> Engine:
        """An engine for a base-model request (round robin over the live ones)."""
        live = self.live_engines()
        if not live:
            raise EngineError(self.down_reason())
        self._rr += 1
        return live[self._rr % len(live)]

    def down_reason(self) -> str:
        reasons = "; ".join(f"{e.url}: {e.reason}" for e in self.engines) or "none registered"
        return f"no vLLM engine is available ({reasons}); retry in a few seconds"

    def loaded_count(self, engine: Engine) -> int:
        """Versions loaded on `engine` by this gateway or another one sharing the work dir."""
        mine = sum(s.is_loaded(engine) for s in [*self.current.values(), *self.draining])
        return max(mine, self.leases.loaded_on(engine.url))

    # -- following the store ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Apply what changed in the store since the last call (the first call: everything)."""
        events, self._seen = await asyncio.to_thread(self.store.changes, self._seen)
        for event, name in events:
            try:
                if event == "removed":
                    self.problems.pop(name, None)
                    self.disabled.discard(name)
                    await self.remove(name)
                elif name not in self.disabled or event == "changed":
                    self.disabled.discard(name)  # a new write of an unloaded adapter serves it
                    await self.add(name)
            except Superseded:
                log.info("not serving %s: unloaded by hand while it was prepared", name)
            except AdapterError as exc:
                self.problems[name] = str(exc)
                log.warning("not serving %s: %s", name, exc)
            except EngineError as exc:
                self.problems[name] = str(exc)
                log.warning("could not load %s into vLLM: %s", name, exc)
            except Exception as exc:  # the pass goes on: the store has moved past this event
                self.problems[name] = f"{type(exc).__name__}: {exc}"
                log.exception("store watcher: %s %s", event, name)
        await asyncio.to_thread(self._refresh_ensembles)

    def _refresh_ensembles(self) -> None:
        """Read the store's ensemble files that are new or changed; forget removed ones."""
        root = self.store.root
        stamps = {n: ensembles.stamp(root, n) for n in ensembles.names(root)}
        for name in set(self.ensembles) | set(self._ensemble_stamps):
            if name not in stamps:
                self.ensembles.pop(name, None)
                self.problems.pop(name, None)
                log.info("stopped serving ensemble %s", name)
        for name, stamp in stamps.items():
            if self._ensemble_stamps.get(name) == stamp:
                continue
            try:
                if (root / name).exists():
                    raise AdapterError("an adapter of the same name is in the store, and it is "
                                       "what this name serves", name,
                                       ensembles.path_of(root, name), "rename one of them")
                ensemble = ensembles.read(root, name)
                if ensemble.base_fingerprint != self.base.fingerprint:
                    raise AdapterError(f"it was fitted on another base model "
                                       f"({ensemble.base_model}, {ensemble.base_fingerprint[:19]})",
                                       name, ensembles.path_of(root, name),
                                       "serve it with the base its members were trained on")
            except AdapterError as exc:
                self.ensembles.pop(name, None)
                self.problems[name] = str(exc)
                log.warning("not serving ensemble %s: %s", name, exc)
                continue
            self.problems.pop(name, None)
            self.ensembles[name] = ensemble
            log.info("serving ensemble %s of %s", name, ", ".join(ensemble.weights))
        self._ensemble_stamps = stamps

    async def add(self, name: str, *, eager: bool = False) -> Served:
        """Validate, snapshot and serve the store's adapter `name` (replacing a served version).

        Loaded into an engine now when one has room (or always with `eager`); otherwise on its
        first request. Raises AdapterError when the store's copy cannot be served.
        """
        self.disabled.discard(name)
        if not self.lora:
            raise AdapterError("this gateway serves the base model alone (--no-lora): restart "
                               "it without --no-lora to serve adapters")
        ticket = self._removals[name]
        fresh = await asyncio.to_thread(self._prepare, name)  # outside the lock: disk, hashing
        self.problems.pop(name, None)
        async with self._lock:
            if self._removals[name] != ticket:  # removed or unloaded meanwhile: that stands
                await self._forget(fresh)
                raise Superseded("it was removed from the store or unloaded while it was being "
                                 "prepared for serving", name, None, "load it again")
            old = self.current.get(name)
            if old is not None and old.identity == fresh.identity:
                served = old  # same bytes (touched, or asked again): nothing to swap
                await self._forget(fresh)
            else:
                served = fresh
                served.last_used = time.monotonic()
            live = self.live_engines()
            if live and not any(served.is_loaded(e) for e in live) and (
                    eager or old is not None or
                    any(self.loaded_count(e) < self.capacity for e in live)):
                try:
                    await self._load_somewhere(served)
                except EngineError:
                    if served is fresh:
                        await self._forget(fresh)
                    raise
            self.current[name] = served
            if old is not None and old is not served:
                await self._retire(old)
                log.info("replaced %s: now %s (was %s)", name, served.identity, old.identity)
            elif old is None:
                log.info("serving %s as %s", name, served.identity)
        return served

    async def remove(self, name: str, *, by_hand: bool = False) -> bool:
        """Stop serving `name`; requests already running on it finish first."""
        async with self._lock:
            self._removals[name] += 1  # an add() preparing it now must not bring it back
            if by_hand:
                self.disabled.add(name)
            served = self.current.pop(name, None)
            if served is not None:
                await self._retire(served)
                log.info("stopped serving %s", name)
        return served is not None

    # -- serving a request ------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, name: str):
        """Hold the current version of `name`, loaded on some engine, for one request (the
        base model, when it is a merged classifier: on any engine, nothing to load)."""
        if name == self.base_name and self.merged is not None:
            yield self.merged, self.pick_engine()
            return
        async with self._lock:
            served = self.get(name)
            engine = await self._load_somewhere(served)
            served.inflight += 1
            served.last_used = time.monotonic()
        try:
            yield served, engine
        finally:
            served.inflight -= 1
            if served.retired and served.inflight == 0:
                # a task, so that a cancelled request still lets the old version go
                asyncio.get_running_loop().create_task(self._drop_if_idle(served))

    # -- engines coming and going -----------------------------------------------------------

    async def restore(self, engine: Engine, previous_generation: int) -> None:
        """After `engine` restarted (empty), load again what it held before, up to capacity."""
        async with self._lock:
            before = [s for s in self.current.values()
                      if s.loaded.get(engine) == previous_generation]
            before.sort(key=lambda s: s.last_used, reverse=True)
            self.leases.forget_engine(engine.url)
            for served in before[:self.capacity]:
                try:
                    await self._load(engine, served)
                except EngineError as exc:
                    log.warning("could not reload %s after a restart: %s", served.name, exc)

    async def close(self) -> None:
        """On shutdown: let go of every version, unloading (from upstreams) and deleting what
        no other gateway holds."""
        async with self._lock:
            for served in [*self.current.values(), *self.draining]:
                for engine in [e for e in list(served.loaded) if e.process is not None]:
                    served.loaded.pop(engine)  # its own vLLM child stops with it
                await self._unload_everywhere(served, others=[])
            self.current.clear()
            self.draining.clear()
        self.leases.release_all()

    # -- internals ---------------------------------------------------------------------------

    async def _load_somewhere(self, served: Served) -> Engine:
        live = self.live_engines()
        if not live:
            raise EngineError(self.down_reason())
        holders = [e for e in live if served.is_loaded(e)]
        if holders:
            return holders[0]
        engine = min(live, key=self.loaded_count)
        await self._make_room(engine, keep=served)
        await self._load(engine, served)
        return engine

    async def _load(self, engine: Engine, served: Served) -> None:
        async with self.leases.locked(served.name):  # no other gateway unloads it meanwhile
            self.leases.hold(engine.url, served.identity)
            try:
                await engine.load_lora(served.identity, str(served.path))
            except EngineError:
                self.leases.release(engine.url, served.identity)
                raise
        served.loaded[engine] = engine.generation
        self._count("loads")

    async def _make_room(self, engine: Engine, keep: Served) -> None:
        while self.loaded_count(engine) >= self.capacity:
            idle = [s for s in self.current.values()
                    if s is not keep and s.inflight == 0 and s.is_loaded(engine)
                    and not self.leases.held_elsewhere(engine.url, s.identity)]
            if not idle:
                return  # all busy: go over by one; vLLM's own LRU cache reloads as needed
            victim = min(idle, key=lambda s: s.last_used)
            victim.loaded.pop(engine, None)
            self._count("evictions")
            log.info("evicted %s from %s (least recently used)", victim.name, engine.url)
            await self._unload(engine, victim)

    async def _unload(self, engine: Engine, served: Served) -> None:
        """Unload `served` from `engine` unless another gateway still holds it there."""
        async with self.leases.locked(served.name):
            if self.leases.release(engine.url, served.identity):
                await _quietly(engine.unload_lora(served.identity))
                self._count("unloads")

    async def _retire(self, served: Served) -> None:
        served.retired = True
        if served.inflight == 0:
            await self._unload_everywhere(served)
        else:
            self.draining.append(served)

    async def _drop_if_idle(self, served: Served) -> None:
        async with self._lock:
            if served.inflight == 0 and served in self.draining:
                self.draining.remove(served)
                await self._unload_everywhere(served)

    async def _unload_everywhere(self, served: Served, others: list[Served] | None = None) \
            -> None:
        if others is None:  # this gateway's other Served of the same version (removed, re-added)
            others = [s for s in [*self.current.values(), *self.draining]
                      if s is not served and s.identity == served.identity]
        for engine in [e for e in list(served.loaded) if served.is_loaded(e)]:
            if not any(o.is_loaded(engine) for o in others):
                await self._unload(engine, served)
        served.loaded.clear()
        await self._forget(served)

    async def _forget(self, served: Served) -> None:
        """`served` is no longer used: its snapshot goes when nothing here or in another
        gateway refers to that version."""
        async with self.leases.locked(served.name):
            if self.leases.unref(served.identity):
                await asyncio.to_thread(shutil.rmtree, served.path.parent, ignore_errors=True)

    def _count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.adapter_event(what)

    def _prepare(self, name: str) -> Served:
        """Store -> checked, immutable snapshot (runs in a thread: disk and hashing)."""
        adapter = self.store.resolve(name, base_fingerprint=self.base.fingerprint)
        check_servable(adapter, self.limits)
        try:
            return self._snapshot(adapter)
        except OSError as exc:  # removed or rewritten while copied, a full disk, permissions
            raise AdapterError(f"could not be copied for serving ({exc})", name, adapter.path,
                               f"check the store and the work dir {self.snapshots.parent} "
                               f"(space, permissions); it is tried again when it changes") \
                from None

    def _snapshot(self, adapter: Adapter) -> Served:
        # under the name's lock: no gateway deletes the pinned version before it is referred to
        with self.leases.locked_sync(adapter.name):
            copy = pin(adapter, self.snapshots, base_fingerprint=self.base.fingerprint,
                       limits=self.limits)
            served = Served(adapter.name, copy, version_id(copy), copy.path)
            self.leases.ref(served.identity)
        return served


async def _quietly(coro) -> None:
    """Unloading is best effort: a dead engine has forgotten everything anyway."""
    try:
        await coro
    except EngineError as exc:
        log.warning("%s", exc)
    except Exception:  # whatever it was, the caller's swap or removal goes on
        log.exception("unloading failed")
