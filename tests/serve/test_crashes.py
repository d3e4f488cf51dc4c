"""The crash guard's logic (serve/crashes.py): shapes, who is blamed for a death, retries; and the
whole path through the gateway against FakeVllm as an upstream engine. The real engine's crash
is driven in test_engine_crash.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest
from serve_helpers import wait_for, write_fake_adapter

from lorastack.serve.crashes import CrashGuard, EngineDied, Shape, shape_of
from lorastack.serve.protocol import ApiError


def test_shape_names_code_path_features_not_content():
    a = shape_of("completions", {"model": "x", "prompt": "hi", "max_tokens": 3,
                                 "temperature": 0.7, "seed": 1}, adapter=True)
    b = shape_of("completions", {"model": "y", "prompt": "other text", "max_tokens": 9},
                 adapter=True)
    assert a == b == Shape("completions", "adapter", ())
    odd = shape_of("completions", {"model": "x", "prompt": [[1, 2], [3]], "n": 2,
                                   "prompt_logprobs": 0, "echo": False, "stream": True},
                   adapter=False)
    assert odd == Shape("completions", "base", ("n > 1", "prompt_logprobs", "several prompts",
                                                "stream", "token ids"))
    assert "prompt_logprobs" in str(odd) and "the base" in str(odd)


class StubEngine:
    """What the guard reads of an engine: generation, up, health, process (None: upstream)."""

    def __init__(self) -> None:
        self.url, self.generation, self.up, self.alive = "stub", 0, True, True
        self.process, self.crashed, self.closed = None, {}, False
        self.reason, self.failed_checks = "ok", 0

    async def healthy(self) -> bool:
        return self.alive


def flight(guard, engine, shape):
    return guard._start(engine, shape)[1]


DEAD = type("R", (), {"text": '{"error": {"message": "EngineCore encountered an issue."}}'})()


def test_never_good_shape_in_flight_is_blamed_and_refused():
    guard, engine = CrashGuard(), StubEngine()
    plain = Shape("completions", "adapter", ())
    odd = Shape("completions", "adapter", ("prompt_logprobs",))
    guard.good.add(plain)
    first = flight(guard, engine, plain)
    flight(guard, engine, odd)
    engine.alive = False
    with pytest.raises(EngineDied) as info:  # the upstream said its EngineCore died
        asyncio.run(guard._raise_if_dead(first, DEAD))
    assert not info.value.killer  # the plain request is retried, not blamed
    assert info.value.death.blamed == {odd}
    with pytest.raises(ApiError) as refused:
        guard.admit(odd)
    assert refused.value.status == 500 and refused.value.code == "refused_engine_killer"
    guard.admit(plain)  # still admitted


def test_an_upstream_that_stops_answering_blames_a_new_shape_only_at_a_second_death():
    """No EngineCore answer from an upstream (a restart, a move): the never-good shape in
    flight is not refused for it; in flight at a second death, it is."""
    guard, engine = CrashGuard(), StubEngine()
    odd = Shape("completions", "adapter", ("prompt_logprobs",))
    engine.alive = False
    for generation in (0, 1):
        engine.generation = generation
        with pytest.raises(EngineDied) as info:
            asyncio.run(guard._raise_if_dead(flight(guard, engine, odd), None))
        guard._flights.clear()
        assert info.value.killer == (generation == 1), info.value.death.cause
    assert "stopped answering" in info.value.death.cause and odd in guard.blocked


def test_an_upstream_that_left_did_not_die():
    guard, engine = CrashGuard(), StubEngine()
    engine.alive, engine.closed = False, True
    asyncio.run(guard._raise_if_dead(flight(guard, engine, Shape("chat", "base", ())), None))
    assert not guard.deaths and not guard.blocked


def test_killed_from_outside_blames_nobody():
    guard, engine = CrashGuard(), StubEngine()
    engine.process = type("P", (), {"exit_code": lambda self: -9,
                                    "crashed_inside": lambda self: False})()
    odd = Shape("chat", "base", ("logprobs",))
    one = flight(guard, engine, odd)
    with pytest.raises(EngineDied) as info:
        asyncio.run(guard._raise_if_dead(one, None))
    assert not info.value.killer and not guard.blocked
    assert "from outside" in info.value.death.cause


def test_good_shapes_blamed_after_second_death():
    guard, engine = CrashGuard(), StubEngine()
    plain = Shape("classify", "adapter", ("logprobs",))
    guard.good.add(plain)
    engine.alive = False
    for generation in (0, 1):
        engine.generation = generation
        one = flight(guard, engine, plain)
        with pytest.raises(EngineDied) as info:
            asyncio.run(guard._raise_if_dead(one, None))
        guard._flights.clear()
    assert info.value.killer and plain in guard.blocked


def test_ordinary_5xx_from_live_engine_is_not_a_death():
    guard, engine = CrashGuard(), StubEngine()
    one = flight(guard, engine, Shape("completions", "base", ()))
    response = type("R", (), {"text": "some other error"})()
    asyncio.run(guard._raise_if_dead(one, response))  # no EngineDied
    assert not guard.deaths


def test_retry_once_waits_for_restart_then_replays():
    guard, engine = CrashGuard(), StubEngine()
    plain = Shape("completions", "adapter", ())
    guard.good.add(plain)
    calls = []

    async def attempt():
        calls.append(engine.generation)
        if len(calls) == 1:
            engine.alive = False
            await guard._raise_if_dead(flight(guard, engine, plain), None)
        return "answer"

    async def restart_later():
        await asyncio.sleep(0.3)
        engine.generation, engine.alive = 1, True

    async def main():
        task = asyncio.create_task(restart_later())
        out = await guard.retry_once(attempt, wait_s=10)
        await task
        return out

    assert asyncio.run(main()) == "answer" and calls == [0, 1]


def test_a_retry_goes_to_another_engine_or_to_one_that_never_went_down(monkeypatch):
    """After a death, the retry does not wait for that engine to restart when another engine
    is up, nor when the engine passes its health checks past SETTLE_S on the same generation
    (a death judged on two missed checks that the supervisor never confirmed)."""
    from lorastack.serve import crashes

    monkeypatch.setattr(crashes, "SETTLE_S", 0.3)
    dead, other = StubEngine(), StubEngine()
    dead.up, other.up = False, True
    guard = CrashGuard(engines=lambda: [dead, other])
    death = crashes.Death(dead, 0, Counter())
    started = time.monotonic()
    asyncio.run(guard.wait_back(death, 5))  # the other engine is up: at once
    assert time.monotonic() - started < 0.5
    alone = CrashGuard(engines=lambda: [dead])
    dead.up, dead.failed_checks = True, 1  # up, but failing checks: wait
    with pytest.raises(ApiError) as info:
        asyncio.run(alone.wait_back(death, 0.6))
    assert info.value.status == 503
    dead.failed_checks = 0  # passing them: after SETTLE_S
    started = time.monotonic()
    asyncio.run(alone.wait_back(death, 5))
    assert 0.3 <= time.monotonic() - started < 1.5


def test_gateway_answers_killer_retries_the_other_and_refuses_the_shape(make, store):
    write_fake_adapter(store, "gen", task="generation")
    with make() as (client, fake, gw):
        engine = gw.engines[0]
        ok = client.post("/v1/completions", json={"model": "gen", "prompt": "hi"})
        assert ok.status_code == 200  # the plain shape has answered well once
        client.portal.call(fake.gate.clear)
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(r=client.post(
            "/v1/completions", json={"model": "gen", "prompt": "WAIT then answer"})))
        thread.start()
        assert wait_for(lambda: fake.seen_models.count(gw.registry.current["gen"].identity) == 2)
        killer = client.post("/v1/completions", json={"model": "gen", "prompt": "KILL",
                                                      "prompt_logprobs": 1})
        assert killer.status_code == 500, killer.text
        assert killer.json()["error"]["code"] == "engine_died"
        assert "prompt_logprobs" in killer.json()["error"]["message"]
        # the supervisor sees the upstream down, then back (with its adapters forgotten)
        assert wait_for(lambda: not engine.up, timeout=20)
        client.portal.call(fake.revive)
        thread.join(60)
        assert waiting["r"].status_code == 200, waiting["r"].text  # retried once, answered
        assert engine.generation == 1
        seen = len(fake.seen_models)
        again = client.post("/v1/completions", json={"model": "gen", "prompt": "KILL again",
                                                     "prompt_logprobs": 0})
        assert again.status_code == 500
        assert again.json()["error"]["code"] == "refused_engine_killer"
        assert len(fake.seen_models) == seen  # refused before it reached the engine
        health = client.get("/health").json()
        assert health["engine_deaths"] == 1
        assert "prompt_logprobs" in health["refused_shapes"][0]["shape"]
        started = time.monotonic()
        assert client.post("/v1/completions", json={"model": "gen", "prompt": "hi"}
                           ).status_code == 200
        assert time.monotonic() - started < 5
