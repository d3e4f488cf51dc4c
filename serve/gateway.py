"""The gateway's running state: engines, registry, tokenizer, metrics, and its background loops.

start() brings vLLM up (or checks the upstreams) and loads the store; two loops then run until
stop(): the store watcher (hot swap) and the supervisor (restarts a dead vLLM child, reloads its
adapters, tracks upstream health).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lorastack.adapters.manifest import ServingLimits
from lorastack.adapters.models import BaseModel, resolve_base
from lorastack.adapters.store import AdapterStore
from lorastack.serve.crashes import CrashGuard
from lorastack.serve.engine import Engine
from lorastack.serve.leases import RENEW_S, registered
from lorastack.serve.metrics import Metrics
from lorastack.serve.registry import Registry
from lorastack.serve.scoring import Tokenizer
from lorastack.serve.settings import ServeSettings, fit_context
from lorastack.serve.vllm_proc import StartError, VllmProcess

log = logging.getLogger("lorastack.serve")


def say(message: str) -> None:
    print(f"lorastack serve: {message}", file=sys.stderr, flush=True)


def servable_modules(model_dir: Path) -> frozenset[str] | None:
    """The module suffixes vLLM serves LoRA on for this base, or None when that cannot be asked
    here (no vLLM, or its probe failed): vLLM's loader then has the last word."""
    from lorastack.adapters.engine_lora import EngineProbeError, engine_lora

    try:
        engine = engine_lora(model_dir)
    except EngineProbeError as exc:
        say(f"could not ask vLLM which modules it serves LoRA on ({exc}); its loader decides")
        return None
    if engine is None:
        return None
    return engine.modules if engine.supports_lora else frozenset()


class Gateway:
    def __init__(self, settings: ServeSettings, *, engines: list[Engine] | None = None,
                 base: BaseModel | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.guard = CrashGuard(metrics=self.metrics, engines=lambda: self.engines)
        self.base = base
        self.engines = engines or []
        self.registry: Registry | None = None
        self.tokenizer: Tokenizer | None = None
        self.started_at = int(time.time())
        self._own_work_dir = settings.work_dir is None
        self.work_dir = Path(settings.work_dir or tempfile.mkdtemp(prefix="lorastack-serve-"))
        self._tasks: list[asyncio.Task] = []
        self.startup_s = 0.0

    @property
    def reg(self) -> Registry:
        """The registry, once start() has built it."""
        if self.registry is None:
            raise RuntimeError("the gateway has not started")
        return self.registry

    @property
    def tok(self) -> Tokenizer:
        """The base model's tokenizer, once start() has loaded it."""
        if self.tokenizer is None:
            raise RuntimeError("the gateway has not started")
        return self.tokenizer

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        s.check_exposure()
        if self.base is None:
            say(f"resolving base model {s.base!r}")
            self.base = await asyncio.to_thread(resolve_base, s.base)
        base = self.base
        self.settings, note = fit_context(s, base.path)
        s = self.settings
        if note:
            say(note)
        self.tokenizer = Tokenizer(base.path)
        # what vLLM's model class for this base carries LoRA on: asked beside the engine start
        modules = asyncio.create_task(asyncio.to_thread(servable_modules, base.path)
                                      if s.lora else asyncio.sleep(0, None))
        try:
            await self._start_serving(modules)
        except BaseException:  # a failed start (or Ctrl-C) leaves no vLLM behind
            self._own_work_dir = False  # but its log, which the error points to, stays
            with contextlib.suppress(Exception):
                await self.stop()
            raise

    async def _start_serving(self, modules: asyncio.Task) -> None:
        s, base = self.settings, self.base
        assert base is not None  # start() resolved it
        if not self.engines:
            self.engines = await self._start_engines()
        for engine in self.engines:
            await self._probe(engine)
        store = AdapterStore(s.store)
        self.registry = Registry(store, base, self.engines, capacity=s.capacity,
                                 limits=ServingLimits(max_rank=s.max_lora_rank,
                                                      target_modules=await modules),
                                 work_dir=self.work_dir, metrics=self.metrics, lora=s.lora)
        reg = self.registry
        await reg.refresh()
        self.metrics.adapters_served.set(len(reg.current))
        say(f"serving {base.name} and {len(reg.current)} adapter(s) from "
            f"{store.root}" + (f"; refused: {', '.join(reg.problems)}" if reg.problems else ""))
        # tokenizer warm-up here, not on the first request
        await asyncio.to_thread(self.tok.get)
        self._tasks = [asyncio.create_task(self._watch_store()),
                       asyncio.create_task(self._supervise())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.registry is not None:  # what no other gateway holds is unloaded from upstreams
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.registry.close(), 30)
        for engine in self.engines:
            if engine.process is not None:
                await asyncio.to_thread(engine.process.stop)
            await engine.aclose()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    async def _start_engines(self) -> list[Engine]:
        s = self.settings
        if s.upstream_dir is not None:
            say(f"following the vLLM servers registered in {s.upstream_dir}")
            return []  # _follow_upstreams adds them as they come
        if s.upstream:
            engines = []
            for url in s.upstream:
                engine = Engine(url, timeout_s=s.request_timeout_s)
                engines.append(engine)
                if not await engine.healthy():
                    say(f"upstream {url} does not answer /health yet; will keep checking")
            return engines
        assert self.base is not None  # start() resolved it
        proc = VllmProcess(s, self.base.path, self.base.name, self.work_dir / "vllm.log")
        say(f"starting vLLM on 127.0.0.1:{proc.port} (log: {proc.log_file})")
        proc.start()
        try:
            self.startup_s = await proc.wait_healthy(s.start_timeout_s, say)
        except StartError as exc:
            proc.stop()
            say(f"vLLM failed to start: {exc}")  # plainly, before the server's traceback
            raise
        except BaseException:  # Ctrl-C or a cancelled start: not yet one of self.engines
            proc.stop()
            raise
        say(f"vLLM is healthy after {self.startup_s:.0f} s")
        return [Engine(proc.url, timeout_s=s.request_timeout_s, process=proc)]

    # -- loops -------------------------------------------------------------------------------

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                await self.reg.refresh()
                self.metrics.adapters_served.set(len(self.reg.current))
            except Exception:  # keep watching whatever one pass hit
                log.exception("store watcher")

    async def _supervise(self) -> None:
        last_health = last_beat = 0.0
        while True:
            await asyncio.sleep(0.5)
            check_health = time.monotonic() - last_health > 2.0
            if check_health:
                last_health = time.monotonic()
            try:
                if time.monotonic() - last_beat > RENEW_S:  # other gateways see it alive
                    last_beat = time.monotonic()
                    await asyncio.to_thread(self.reg.leases.heartbeat)
                if check_health and self.settings.upstream_dir is not None:
                    await self._follow_upstreams(self.settings.upstream_dir)
            except Exception:
                log.exception("supervisor")
            for engine in self.engines:
                try:
                    if engine.process is not None and engine.process.exit_code() is not None:
                        await self._restart(engine)
                    elif check_health:
                        await self._check(engine)
                except Exception:
                    log.exception("supervisor")
                self.metrics.vllm_up.labels(engine.url).set(int(engine.up))

    async def _follow_upstreams(self, folder: Path) -> None:
        """Engines for the servers registered in `folder` (serve/leases.py's registrations);
        one whose registration went away (stopped, or silent past the lease TTL) is dropped."""
        urls = await asyncio.to_thread(registered, folder)
        for engine in [e for e in self.engines if e.url not in urls]:
            say(f"vLLM at {engine.url} left ({folder}); its requests go to the others")
            self.engines.remove(engine)
            engine.up, engine.reason = False, "deregistered"
            engine.generation += 1  # what the registry thinks is loaded there is gone
            self.reg.leases.forget_engine(engine.url)
            self.metrics.vllm_up.labels(engine.url).set(0)
            await engine.aclose()  # requests in flight there fail as EngineError
        known = {e.url for e in self.engines}
        for url in sorted(urls - known):
            engine = Engine(url, timeout_s=self.settings.request_timeout_s)
            await self._probe(engine)
            self.engines.append(engine)
            say(f"vLLM at {url} joined ({folder})")

    async def _probe(self, engine: Engine) -> None:
        """A first look at an engine: up or not, and the base model's name on it."""
        engine.up = await engine.healthy()
        engine.reason = "ok" if engine.up else "not answering /health"
        if engine.up and engine.base_id is None:
            engine.base_id = await engine.served_base()
        self.metrics.vllm_up.labels(engine.url).set(int(engine.up))

    async def _check(self, engine: Engine) -> None:
        healthy = await engine.healthy()
        engine.failed_checks = 0 if healthy else engine.failed_checks + 1
        if not healthy and engine.failed_checks < 3:
            return  # a busy CPU can delay one answer: three misses in a row mean down
        if healthy and not engine.up and engine.process is None:
            # an upstream came back: it may have restarted and forgotten its adapters
            previous = engine.generation
            engine.generation += 1
            engine.up, engine.reason = True, "ok"
            await self.reg.restore(engine, previous)
        engine.up = healthy
        engine.reason = "ok" if healthy else "not answering /health"
        if healthy and engine.base_id is None:
            engine.base_id = await engine.served_base()

    async def _restart(self, engine: Engine) -> None:
        proc = engine.process
        code = proc.exit_code()
        engine.up = False
        engine.reason = f"vLLM exited (code {code}); restarting it"
        say(f"{engine.reason}.\n{proc.describe_log(15)}")
        if not self.settings.restart_vllm:
            engine.reason = f"vLLM exited (code {code}); restarts are off"
            await asyncio.sleep(5)
            return
        self.metrics.vllm_restarts.inc()
        previous = engine.generation
        engine.crashed[previous] = proc.crashed_inside()  # read before the log moves on
        engine.generation += 1  # everything it had loaded is gone
        proc.stop()
        proc.start()
        try:
            seconds = await proc.wait_healthy(self.settings.start_timeout_s, say)
        except StartError as exc:
            engine.reason = f"restart failed: {str(exc).splitlines()[0]}; retrying"
            say(str(exc))
            await asyncio.sleep(5)
            return
        engine.up, engine.reason = True, "ok"
        await self.reg.restore(engine, previous)
        say(f"vLLM restarted in {seconds:.0f} s; adapters reloaded")
