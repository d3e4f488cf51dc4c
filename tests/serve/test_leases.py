"""Gateways that share engines and a work dir agree on what is loaded (serve/leases.py): none
unloads or deletes what another serves; a dead gateway's leases expire. Two real gateways over
FakeVllm here; tests/serve/test_integration.py runs two over real vLLM."""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack, contextmanager

import httpx
from fake_vllm import FakeVllm
from fastapi.testclient import TestClient
from serve_helpers import wait_for, write_fake_adapter

from lorastack.serve.app import create_app
from lorastack.serve.engine import Engine
from lorastack.serve.gateway import Gateway
from lorastack.serve.leases import Leases, engine_key
from lorastack.serve.settings import ServeSettings

URL = "http://fake-vllm"
ADMIN = {"Authorization": "Bearer admin"}


@contextmanager
def gateways(fake_base, store, work, *polls):
    """One gateway per poll interval over one FakeVllm and one work dir: (fake, [(client, gw)])."""
    fake = FakeVllm()
    with ExitStack() as stack:
        pairs = []
        for poll in polls:
            engine = Engine(URL, transport=httpx.ASGITransport(fake.app))
            gw = Gateway(ServeSettings(store=store.root, work_dir=work, poll_interval_s=poll,
                                       capacity=1, max_loras=1, admin_key="admin",
                                       max_prompt_tokens=64, max_model_len=128, max_tokens=8),
                         engines=[engine], base=fake_base)
            pairs.append((stack.enter_context(TestClient(create_app(gateway=gw))), gw))
        yield fake, pairs


def ok(client, model):
    r = client.post("/v1/completions", json={"model": model, "prompt": "x"}, headers=ADMIN)
    assert r.status_code == 200, r.text


def test_no_gateway_unloads_or_deletes_what_another_serves(fake_base, store, tmp_path):
    write_fake_adapter(store, "a")
    work = tmp_path / "shared"
    with gateways(fake_base, store, work, 0.05, 3600) as (fake, [(a, ga), (b, gb)]):
        ok(a, "a")
        ok(b, "a")
        v1 = ga.reg.current["a"]
        assert gb.reg.current["a"].identity == v1.identity and v1.identity in fake.loaded
        # a replaces it; b has not looked at the store yet and keeps serving the first version
        write_fake_adapter(store, "a", salt=1, replace=True)
        assert wait_for(lambda: ga.reg.current["a"].identity != v1.identity)
        v2 = ga.reg.current["a"].identity
        ok(a, "a")
        assert v1.identity in fake.loaded and v1.path.exists()  # b holds it: not unloaded
        ok(b, "a")
        # b swaps too: the last to let v1 go unloads it and deletes its snapshot
        assert b.post("/v1/adapters/load", json={"name": "a"}, headers=ADMIN).status_code == 200
        assert gb.reg.current["a"].identity == v2
        assert v1.identity not in fake.loaded and not v1.path.parent.exists()
        assert ("unload", v1.identity) in fake.events
        # capacity 1 each: a's eviction for b-the-adapter must not unload v2, which b uses
        write_fake_adapter(store, "other")
        assert wait_for(lambda: "other" in ga.reg.current)
        ok(b, "a")
        ok(a, "other")
        assert v2 in fake.loaded and ga.reg.loaded_count(ga.engines[0]) == 2  # over by one
        ok(b, "a")
        # an admin unload on a leaves b serving; b's own unload then really unloads
        assert a.post("/v1/adapters/unload", json={"name": "a"}, headers=ADMIN).status_code == 200
        assert v2 in fake.loaded
        ok(b, "a")
        assert b.post("/v1/adapters/unload", json={"name": "a"}, headers=ADMIN).status_code == 200
        assert v2 not in fake.loaded
        assert not (work / "snapshots" / v2).exists()
    # both stopped: what they loaded on the upstream is unloaded, their leases are gone
    assert not fake.loaded
    assert not [p for p in (work / "leases").rglob("*") if p.is_file()
                and p.parent.name != "locks"]


def test_a_dead_gateways_leases_expire(tmp_path):
    alive = Leases(tmp_path, ttl_s=30, gateway="alive")
    dead = Leases(tmp_path, ttl_s=30, gateway="dead")
    dead.hold(URL, "a@1")
    dead.ref("a@1")
    alive.hold(URL, "a@1")
    alive.ref("a@1")
    assert alive.held_elsewhere(URL, "a@1") and alive.loaded_on(URL) == 1
    assert not alive.release(URL, "a@1") and not alive.unref("a@1")  # dead still counts
    alive.hold(URL, "a@1")
    old = time.time() - 60  # dead stopped renewing them a minute ago
    for path in (tmp_path / "engines" / engine_key(URL) / "a@1" / "dead",
                 tmp_path / "refs" / "a@1" / "dead"):
        os.utime(path, (old, old))
    alive.heartbeat()
    assert not alive.held_elsewhere(URL, "a@1")
    assert alive.release(URL, "a@1") and alive.unref("a@1")
    assert not (tmp_path / "refs" / "a@1").exists()  # swept with the stale lease
    dead.heartbeat()  # a gateway that was only slow re-creates its leases
    assert alive.held_elsewhere(URL, "a@1")


def test_the_name_lock_excludes_other_holders(tmp_path):
    first, second = Leases(tmp_path, gateway="1"), Leases(tmp_path, gateway="2")
    order: list[str] = []
    entered = threading.Event()

    def other():
        with second.locked_sync("a"):
            order.append("second")

    with first.locked_sync("a"):
        thread = threading.Thread(target=other)
        thread.start()
        entered.wait(0.3)  # give the other holder time to (wrongly) get in
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]


def test_a_request_cancelled_while_it_waits_for_the_lock_gives_it_back(tmp_path):
    """The wait runs in a thread that takes the lock after its waiter was cancelled (a client
    that went away): the lock is released then, not held for ever."""
    import asyncio
    import contextlib

    leases = Leases(tmp_path, gateway="1")
    holder_in, holder_out = threading.Event(), threading.Event()

    def holder():
        with leases.locked_sync("a"):
            holder_in.set()
            holder_out.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert holder_in.wait(5)

    async def main():
        async def wait_for_lock():
            async with leases.locked("a"):
                pass

        task = asyncio.create_task(wait_for_lock())
        await asyncio.sleep(0.2)  # waiting in its thread
        task.cancel()
        holder_out.set()  # the thread now takes the lock for a waiter that is gone
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):  # taken again: it was given back
            async with leases.locked("a"):
                return True

    assert asyncio.run(main())
    thread.join(5)


def test_a_version_used_twice_in_one_gateway_stays_until_both_let_go(tmp_path):
    """Removed and re-added while its old Served drains: two users, one gateway, one file."""
    leases = Leases(tmp_path, gateway="g")
    leases.ref("a@1")
    leases.ref("a@1")
    assert not leases.unref("a@1") and (tmp_path / "refs" / "a@1" / "g").exists()
    assert leases.unref("a@1") and not (tmp_path / "refs" / "a@1").exists()


def test_a_gateway_follows_the_servers_registered_in_its_upstream_dir(fake_base, store,
                                                                        tmp_path):
    """--upstream-dir (the Ray app's replicas): a server that registers joins, one whose
    registration goes (stopped, or not renewed for 30 s) leaves."""
    import uvicorn

    from lorastack.serve.leases import register, registered
    from lorastack.serve.vllm_proc import listening_socket

    write_fake_adapter(store, "a")
    fake = FakeVllm()
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning"))
    thread = threading.Thread(target=server.run, args=([sock],), daemon=True)
    thread.start()
    folder = tmp_path / "upstreams"
    gw = Gateway(ServeSettings(store=store.root, work_dir=tmp_path / "work", upstream_dir=folder,
                               poll_interval_s=0.05, max_prompt_tokens=64, max_model_len=128),
                 base=fake_base)
    try:
        with TestClient(create_app(gateway=gw)) as client:
            assert client.get("/health").status_code == 503 and gw.engines == []
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            path = register(folder, "replica-1", url)
            assert registered(folder) == {url}
            assert wait_for(lambda: client.get("/health").status_code == 200)
            ok(client, "a")
            assert [e.url for e in gw.engines] == [url] and fake.loaded
            old = time.time() - 60  # not renewed: the replica died without unregistering
            os.utime(path, (old, old))
            assert registered(folder) == set()
            assert wait_for(lambda: gw.engines == [])
            r = client.post("/v1/completions", json={"model": "a", "prompt": "x"})
            assert r.status_code == 503 and "no vLLM engine" in r.json()["error"]["message"]
            register(folder, "replica-2", url)  # a new replica at the same address
            assert wait_for(lambda: client.get("/health").status_code == 200)
            ok(client, "a")
    finally:
        server.should_exit = True
        thread.join(10)
