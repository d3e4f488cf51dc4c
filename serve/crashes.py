"""Requests that take vLLM's engine down: answered, refused from then on; the others retried.

When vLLM's EngineCore dies, every request in flight fails at once and the server exits; the
gateway restarts it (gateway.py), which takes tens of seconds on a CPU. Without more, a request
that crashes the engine can be sent again, and again, and keep the server down for everyone.

So every request the gateway sends to an engine is watched, under its *shape*: the route, base
model or adapter, and the features that choose vLLM's code path (the body's keys beyond its
content, a batch of prompts, token-id prompts, n > 1). After a 5xx or a broken connection the
guard asks whether the engine died (its answer says so, its process exited, or /health fails
twice); if it did, the first request to see it judges the death, once for all:
- the suspects are the requests in flight when the first of them failed;
- a suspect shape that never got a good answer from any engine is taken for the killer; if
  every suspect shape had succeeded before, a shape in flight at two deaths is;
- when the child's log shows no exception in EngineCore (killed from outside: `kill -9`, the
  out-of-memory killer), no shape is blamed;
- an upstream's log is not the gateway's to read: a never-good shape is blamed there only when
  vLLM answered that its EngineCore died; an upstream that just stopped answering (restarted,
  moved, its network) blames only a shape in flight at two deaths. An upstream that leaves
  (--upstream-dir) did not die: its requests fail with an ordinary 503.
A killer's request is answered 500, saying so; later requests of that shape are refused with
500 before they reach vLLM (until the gateway restarts; /health lists them). The other requests
are retried once on the restarted engine when the route can replay them (classify, completions
that are not streamed); streams end with an error event, as their bytes are already out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from lorastack.serve.engine import Engine, EngineError
from lorastack.serve.protocol import ApiError

log = logging.getLogger("lorastack.serve")
T = TypeVar("T")

# Body keys that carry content or plain numbers, not a choice of code path.
CONTENT_KEYS = frozenset({"model", "prompt", "messages", "user", "seed", "max_tokens",
                          "max_completion_tokens", "temperature", "top_p", "n", "request_id"})
DEAD_ANSWER = "EngineCore encountered an issue"  # vLLM's EngineDeadError message
SETTLE_S = 8.0  # an engine still up this long after a death on the same generation never died


@dataclass(frozen=True)
class Shape:
    route: str  # completions, chat, classify
    target: str  # base or adapter
    features: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.route} on {'an adapter' if self.target == 'adapter' else 'the base'}" + \
            (f" with {', '.join(self.features)}" if self.features else " (plain)")


def shape_of(route: str, body: dict, adapter: bool) -> Shape:
    """The shape of a vLLM-bound body (see the module's docstring)."""
    features = {k for k, v in body.items()  # 0 counts: prompt_logprobs=0 takes that path
                if k not in CONTENT_KEYS and v is not None and v is not False
                and v != [] and v != {}}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        features.add("several prompts")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int | list):
        features.add("token ids")
    if isinstance(body.get("n"), int) and body["n"] > 1:
        features.add("n > 1")
    return Shape(route, "adapter" if adapter else "base", tuple(sorted(features)))


@dataclass(eq=False)
class _Flight:
    engine: Engine
    generation: int
    shape: Shape
    started: float


@dataclass
class Death:
    """One death of one engine generation, judged by the first request that saw it."""

    engine: Engine
    generation: int
    suspects: Counter
    blamed: set[Shape] = field(default_factory=set)
    cause: str = ""


class EngineDied(Exception):
    """The engine died while serving this request; `killer` when its shape is blamed."""

    def __init__(self, death: Death, shape: Shape) -> None:
        self.death, self.shape = death, shape
        self.killer = shape in death.blamed
        if self.killer:
            message = (f"vLLM's engine died while serving this request ({death.cause}). "
                       f"Requests of this shape ({shape}) are refused from now on so that they "
                       f"cannot take the server down for everyone; send it without the "
                       f"features named, or report it with the engine's log.")
        else:
            message = (f"vLLM's engine died while serving this request, because of another "
                       f"request or from outside ({death.cause}); it is being restarted")
        super().__init__(message)

    def answer(self) -> ApiError:
        """The HTTP answer: 500 for the killer (its fault is the server's defect), 503 for the
        others (retry: the engine is coming back)."""
        if self.killer:
            return ApiError(500, str(self), "engine_died")
        return ApiError(503, str(self), "engine_unavailable")


class CrashGuard:
    """Shared by the gateway's engines: what succeeded, what killed, what is in flight."""

    def __init__(self, *, death_check_s: float = 15.0, metrics=None,
                 engines: Callable[[], list[Engine]] | None = None) -> None:
        self.death_check_s = death_check_s
        self.metrics = metrics
        self.engines = engines or list  # the gateway's, for a retry elsewhere
        self.good: set[Shape] = set()
        self.blocked: dict[Shape, str] = {}  # shape -> why (when, which death)
        self.deaths: list[Death] = []
        self._at_deaths: Counter = Counter()  # shape -> deaths it was in flight at
        self._flights: dict[int, _Flight] = {}
        self._ids = itertools.count()
        self._judged: dict[tuple[int, int], Death] = {}
        self._lock = asyncio.Lock()

    # -- around one request --------------------------------------------------------------

    def admit(self, shape: Shape) -> None:
        """Refuse a shape that killed the engine before it reaches vLLM."""
        why = self.blocked.get(shape)
        if why is not None:
            raise ApiError(500, f"requests of this shape ({shape}) are refused: {why}. They "
                           f"would take vLLM's engine down for everyone; send the request "
                           f"without those features (the refusal ends when the gateway "
                           f"restarts).", "refused_engine_killer")

    async def post(self, engine: Engine, path: str, body: dict, shape: Shape) -> httpx.Response:
        """engine.post_json, watched: raises EngineDied when the engine died meanwhile."""
        self.admit(shape)
        flight_id, flight = self._start(engine, shape)
        try:
            try:
                response = await engine.post_json(path, body)
            except EngineError:
                await self._raise_if_dead(flight, None)
                raise
            if response.status_code < 500:
                self.good.add(shape)
            else:
                await self._raise_if_dead(flight, response)
            return response
        finally:
            self._flights.pop(flight_id, None)

    def watch(self, engine: Engine, shape: Shape) -> Watch:
        """For a stream: held until its last byte; `failed()` when it broke."""
        self.admit(shape)
        return Watch(self, *self._start(engine, shape))

    def _start(self, engine: Engine, shape: Shape) -> tuple[int, _Flight]:
        flight_id = next(self._ids)
        flight = _Flight(engine, engine.generation, shape, time.monotonic())
        self._flights[flight_id] = flight
        return flight_id, flight

    # -- deciding ------------------------------------------------------------------------

    async def _raise_if_dead(self, flight: _Flight, response: httpx.Response | None) -> None:
        failed_at = time.monotonic()
        if not await self._died(flight, response):
            return
        async with self._lock:  # one judgement per death, by the first request to see it
            key = (id(flight.engine), flight.generation)
            death = self._judged.get(key)
            if death is None:
                death = self._judge(flight, failed_at)
                self._judged[key] = death
        raise EngineDied(death, flight.shape)

    async def _died(self, flight: _Flight, response: httpx.Response | None) -> bool:
        engine = flight.engine
        if engine.closed:
            return False  # deregistered, not dead: an ordinary error, retried by the client
        if response is not None and DEAD_ANSWER in response.text:
            if engine.process is None:  # an upstream: its answer is all the gateway sees
                engine.crashed.setdefault(flight.generation, True)
            return True
        deadline = time.monotonic() + self.death_check_s
        misses = 0
        while time.monotonic() < deadline:
            if engine.generation != flight.generation:
                return True  # already restarted
            if engine.process is not None and engine.process.exit_code() is not None:
                return True
            if await engine.healthy():
                return False  # alive: an ordinary error, passed on as it is
            misses += 1
            if misses >= 2:  # vLLM's /health answers 503 at once when its engine is dead
                return True
            await asyncio.sleep(0.5)
        return False

    def _judge(self, first: _Flight, failed_at: float) -> Death:
        suspects = Counter(f.shape for f in self._flights.values()
                           if f.engine is first.engine and f.generation == first.generation
                           and f.started <= failed_at)
        death = Death(first.engine, first.generation, suspects)
        crashed = _crashed_inside(first.engine, first.generation)
        for shape in suspects:
            self._at_deaths[shape] += 1
        if crashed is False:
            death.cause = "its process was stopped from outside, no request is blamed"
        else:
            # an upstream that just stopped answering (crashed None: restarted, moved, its
            # network) proves nothing against a new shape: only a second death does
            never_good = {s for s in suspects if s not in self.good} if crashed else set()
            death.blamed = never_good or {s for s in suspects if self._at_deaths[s] >= 2}
            death.cause = ("EngineCore raised an exception" if first.engine.process is not None
                           else "vLLM answered that its EngineCore died") if crashed else \
                "the engine stopped answering"
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        for shape in death.blamed:
            self.blocked[shape] = f"one killed vLLM's engine at {when} ({death.cause})"
        self.deaths.append(death)
        if self.metrics is not None:
            self.metrics.engine_deaths.inc()
        log.error("vLLM's engine at %s died (%s) with %d request(s) in flight; blamed: %s",
                  first.engine.url, death.cause, sum(suspects.values()),
                  "; ".join(map(str, death.blamed)) or "none")
        return death

    # -- after a death -------------------------------------------------------------------

    async def retry_once(self, attempt: Callable[[], Awaitable[T]], *,
                         wait_s: float) -> T:
        """Run `attempt`; if the engine died under it and its shape is not blamed, wait for
        the engine to come back and run it once more. A death becomes a 500 that says so."""
        try:
            return await attempt()
        except EngineDied as died:
            if died.killer:
                raise died.answer() from None
            await self.wait_back(died.death, wait_s)
            log.info("retrying a %s request after the engine's restart", died.shape)
        try:
            return await attempt()
        except EngineDied as again:
            raise ApiError(500, f"{again} (this was the request's retry)", "engine_died") \
                from None

    async def wait_back(self, death: Death, wait_s: float) -> None:
        """Until a retry can go somewhere: the engine back (restarted), another engine up, or
        the engine up and passing its health checks past SETTLE_S on the same generation
        (never down: the supervisor marks an engine down after three failed checks, 2 s
        apart)."""
        engine, start = death.engine, time.monotonic()
        deadline = start + wait_s
        while not ((engine.up and engine.generation != death.generation)
                   or any(e.up for e in self.engines() if e is not engine)
                   or (engine.up and not engine.failed_checks
                       and time.monotonic() - start > SETTLE_S)):
            if time.monotonic() > deadline:
                raise ApiError(503, f"vLLM's engine died and did not come back within "
                               f"{wait_s:.0f} s ({engine.reason}); retry later",
                               "engine_unavailable", headers={"Retry-After": "10"})
            await asyncio.sleep(0.5)


class Watch:
    """One stream's flight; leave with `close()`, report a break with `failed()`."""

    def __init__(self, guard: CrashGuard, flight_id: int, flight: _Flight) -> None:
        self.guard, self.flight_id, self.flight = guard, flight_id, flight

    def succeeded(self) -> None:
        self.guard.good.add(self.flight.shape)

    async def failed(self) -> EngineDied | None:
        try:
            await self.guard._raise_if_dead(self.flight, None)
        except EngineDied as died:
            return died
        return None

    def close(self) -> None:
        self.guard._flights.pop(self.flight_id, None)


def _crashed_inside(engine: Engine, generation: int) -> bool | None:
    """For the gateway's own child: did EngineCore raise (True) or was it killed (False)?
    None for an upstream, whose log the gateway cannot read."""
    if generation in engine.crashed:  # recorded by the supervisor before it restarted it
        return engine.crashed[generation]
    if engine.process is None:
        return None
    return engine.process.crashed_inside()
