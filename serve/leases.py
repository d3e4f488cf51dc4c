"""Leases: how gateways that share engines and a work directory agree on what is loaded.

Several gateways behind one load balancer run over the same vLLM engines (`--upstream`) and
the same `--work-dir` (a volume that they and vLLM see at one path). Each gateway records what
it relies on as empty files under `<work dir>/leases/`:

- `refs/<identity>/<gateway>`: it serves this adapter version, so the version's snapshot (the
  directory vLLM loads, and may read again) must stay;
- `engines/<engine>/<identity>/<gateway>`: it loaded the version on that engine, so no other
  gateway may unload it there.

A gateway touches its files every few seconds (`heartbeat`); a file older than `ttl_s` belongs
to a gateway that died and counts for nothing (clocks of the hosts sharing the volume must
agree to well within it). Loading, unloading and deleting a snapshot happen under an exclusive
lock per adapter name (`flock` on `locks/<name>`), after checking the other gateways' leases:
so a load and another gateway's unload of the same version never interleave, and the last
gateway to let a version go is the one that unloads it and deletes its snapshot. (A thread
lock per name backs the flock, which NFS emulates with per-process locks.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

TTL_S = 30.0  # a lease or registration not renewed for this long belongs to a process that died
RENEW_S = 5.0  # how often the living renew theirs


def engine_key(url: str) -> str:
    """A directory name for an engine: every gateway must name it by the same URL."""
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


class Leases:
    def __init__(self, root: Path, *, ttl_s: float = TTL_S, gateway: str | None = None) -> None:
        self.root, self.ttl_s = root, ttl_s
        self.gateway = gateway or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._mine: set[Path] = set()
        self._refs: Counter[str] = Counter()  # this gateway's users of each version's snapshot
        self._threads: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        for part in ("locks", "refs", "engines"):
            (root / part).mkdir(parents=True, exist_ok=True)

    # -- the lock ----------------------------------------------------------------------------

    @contextmanager
    def locked_sync(self, name: str):
        """Exclusive, across threads and processes, for decisions about adapter `name`."""
        fd = self._acquire(name)
        try:
            yield
        finally:
            self._release(name, fd)

    @asynccontextmanager
    async def locked(self, name: str):
        """locked_sync for the event loop: the wait for another holder runs in a thread."""
        taking = asyncio.ensure_future(asyncio.to_thread(self._acquire, name))
        try:
            fd = await asyncio.shield(taking)
        except asyncio.CancelledError:  # the thread still takes the lock: give it back then
            def give_back(done: asyncio.Future) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._release(name, done.result())

            taking.add_done_callback(give_back)
            raise
        try:
            yield
        finally:
            self._release(name, fd)

    def _acquire(self, name: str) -> int:
        with self._guard:
            thread_lock = self._threads.setdefault(name, threading.Lock())
        thread_lock.acquire()
        try:
            fd = os.open(self.root / "locks" / name, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            thread_lock.release()
            raise
        return fd

    def _release(self, name: str, fd: int) -> None:
        os.close(fd)  # closing releases the flock
        self._threads[name].release()

    # -- what this gateway holds (call under the name's lock) ---------------------------------

    def ref(self, identity: str) -> None:
        """One more user of the version here (a Served object of the registry)."""
        self._refs[identity] += 1
        self._take(self.root / "refs" / identity / self.gateway)

    def unref(self, identity: str) -> bool:
        """One user fewer; True when no user here nor any live gateway refers to it any more."""
        self._refs[identity] -= 1
        if self._refs[identity] > 0:
            return False
        del self._refs[identity]
        return self._drop(self.root / "refs" / identity)

    def hold(self, url: str, identity: str) -> None:
        self._take(self.root / "engines" / engine_key(url) / identity / self.gateway)

    def release(self, url: str, identity: str) -> bool:
        """Drop this gateway's hold; True when no live gateway holds it on the engine."""
        return self._drop(self.root / "engines" / engine_key(url) / identity)

    def held_elsewhere(self, url: str, identity: str) -> bool:
        return bool(self._live(self.root / "engines" / engine_key(url) / identity, mine=False))

    def loaded_on(self, url: str) -> int:
        """How many versions some live gateway holds on the engine: its shared occupancy."""
        engine = self.root / "engines" / engine_key(url)
        try:
            return sum(bool(self._live(d, mine=True)) for d in engine.iterdir())
        except FileNotFoundError:
            return 0

    def forget_engine(self, url: str) -> None:
        """The engine restarted empty: this gateway's holds on it say nothing any more."""
        engine = self.root / "engines" / engine_key(url)
        for path in [p for p in self._mine if p.parent.parent == engine]:
            self._mine.discard(path)
            path.unlink(missing_ok=True)

    def heartbeat(self) -> None:
        """Keep this gateway's leases live (re-created where a stale sweep removed them)."""
        now = time.time()
        for path in list(self._mine):
            try:
                os.utime(path, (now, now))
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

    def release_all(self) -> None:
        """On shutdown: this gateway holds nothing any more (nothing is unloaded here)."""
        for path in list(self._mine):
            path.unlink(missing_ok=True)
        self._mine.clear()

    # -- internals ---------------------------------------------------------------------------

    def _take(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        self._mine.add(path)

    def _drop(self, folder: Path) -> bool:
        mine = folder / self.gateway
        self._mine.discard(mine)
        mine.unlink(missing_ok=True)
        if self._live(folder, mine=False):
            return False
        with contextlib.suppress(OSError):  # a stale lease is left, or one was just taken
            folder.rmdir()
        return True

    def _live(self, folder: Path, *, mine: bool) -> list[str]:
        """Gateways with a live lease in `folder`; stale ones are swept on the way."""
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        cutoff, live = time.time() - self.ttl_s, []
        for entry in entries:
            if entry.name == self.gateway and not mine:
                continue
            try:
                fresh = entry.stat().st_mtime >= cutoff
            except FileNotFoundError:
                continue
            if fresh:
                live.append(entry.name)
            elif entry.name != self.gateway:
                Path(entry.path).unlink(missing_ok=True)  # a gateway that died
        return live


def register(folder: Path, key: str, url: str) -> Path:
    """Announce a server at `url` to the gateways following `folder` (renew with `touch`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / key
    tmp = folder / f".{key}.tmp"
    tmp.write_text(url)
    tmp.replace(path)
    return path


def registered(folder: Path, ttl_s: float = TTL_S) -> set[str]:
    """The URLs registered in `folder` and renewed within `ttl_s`."""
    cutoff, urls = time.time() - ttl_s, set()
    try:
        entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    except FileNotFoundError:
        return set()
    for entry in entries:
        try:
            if entry.stat().st_mtime >= cutoff:
                urls.add(Path(entry.path).read_text().strip().rstrip("/"))
        except (FileNotFoundError, OSError):
            continue
    return urls
