"""Fast unit tests of the gateway's own logic against FakeVllm: routing, identities, hot swap,
draining, LRU, auth, limits, errors. The real engine is exercised in test_integration.py."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from fake_vllm import FakeVllm
from fastapi.testclient import TestClient
from serve_helpers import wait_for, write_fake_adapter

from lorastack.serve.app import create_app
from lorastack.serve.engine import Engine
from lorastack.serve.gateway import Gateway
from lorastack.serve.settings import ServeSettings, SettingsError

ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}


def test_models_and_forwarding_under_identity(make, store):
    write_fake_adapter(store, "cls")
    write_fake_adapter(store, "gen", task="generation")
    with make() as (client, fake, gw):
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert set(models) == {"smollm2-135m", "cls", "gen"}
        assert models["cls"]["task"] == "classification"
        assert models["cls"]["labels"] == ["yes", "no"]
        assert models["cls"]["examples"] == [] and models["cls"]["lora"]["rank"] >= 1
        answer = client.post("/v1/completions", json={"model": "gen", "prompt": "hi"}).json()
        identity = gw.registry.current["gen"].identity
        assert identity.startswith("gen@") and fake.seen_models[-1] == identity
        assert answer["model"] == "gen"  # the identity never leaks to the client
        assert identity in answer["choices"][0]["text"]
        base = client.post("/v1/chat/completions", json={
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}).json()
        assert base["model"] == "smollm2-135m"


def test_classify_single_batch_and_ensemble(make, store):
    write_fake_adapter(store, "a")
    write_fake_adapter(store, "b", salt=1)
    write_fake_adapter(store, "other", labels=("positive", "negative"))
    with make() as (client, _, _):
        one = client.post("/v1/classify", json={"model": "a", "input": "great"}).json()
        assert len(one["data"]) == 1
        probs = one["data"][0]["probabilities"]
        assert set(probs) == {"yes", "no"} and abs(sum(probs.values()) - 1) < 1e-9
        assert one["data"][0]["label"] == max(probs, key=probs.get)
        batch = client.post("/v1/classify", json={"model": "a", "input": ["x", "y", "z"],
                                                  "top_k": 1}).json()
        assert [d["index"] for d in batch["data"]] == [0, 1, 2]
        assert len(batch["data"][0]["top"]) == 1
        both = client.post("/v1/classify", json={"model": ["a", "b"], "input": ["x"]}).json()
        assert set(both["data"][0]["members"]) == {"a", "b"}
        mixed = client.post("/v1/classify", json={"model": ["a", "other"], "input": "x"})
        assert mixed.status_code == 400 and "label set" in mixed.json()["error"]["message"]


def test_hot_load_replace_and_unload(make, store):
    with make() as (client, fake, gw):
        assert client.get("/v1/models").json()["data"][1:] == []
        write_fake_adapter(store, "new")
        assert wait_for(lambda: "new" in gw.registry.current)
        first = gw.registry.current["new"].identity
        write_fake_adapter(store, "new", salt=2, replace=True)
        assert wait_for(lambda: gw.registry.current["new"].identity != first)
        assert wait_for(lambda: ("unload", first) in fake.events)  # idle: it goes at once
        r = client.post("/v1/adapters/unload", json={"name": "new"})
        assert r.status_code == 200
        gone = client.post("/v1/completions", json={"model": "new", "prompt": "x"})
        assert gone.status_code == 404 and "adapters/load" in gone.json()["error"]["message"]
        time.sleep(0.2)  # the watcher must not bring it back by itself
        assert "new" not in gw.registry.current
        assert client.post("/v1/adapters/load", json={"name": "new"}).status_code == 200
        assert client.post("/v1/completions", json={"model": "new", "prompt": "x"}).status_code \
            == 200
        missing = client.post("/v1/adapters/load", json={"name": "nope"})
        assert missing.status_code == 404


def test_classify_scores_the_version_it_checked_or_says_it_changed(make, store, monkeypatch):
    """A swap between the route's checks and the scoring: a new version with the same labels is
    scored; one whose labels changed is a 409 that says so, not a 500."""
    write_fake_adapter(store, "a")
    with make() as (client, _, gw):
        reg = gw.registry
        old = reg.current["a"]
        write_fake_adapter(store, "a", salt=1, replace=True)  # the same labels
        assert wait_for(lambda: reg.current["a"] is not old)
        real_get, stale = reg.get, []

        def get(name):  # the route's check reads `old`; the scoring holds what is current
            return stale.pop() if name == "a" and stale else real_get(name)

        monkeypatch.setattr(reg, "get", get)
        stale.append(old)
        r = client.post("/v1/classify", json={"model": "a", "input": ["fine"]})
        assert r.status_code == 200 and not stale, r.text
        assert set(r.json()["data"][0]["probabilities"]) == {"yes", "no"}
        newer = reg.current["a"]
        write_fake_adapter(store, "a", salt=2, replace=True, labels=("good", "bad"))
        assert wait_for(lambda: reg.current["a"] is not newer)
        stale.append(newer)
        r = client.post("/v1/classify", json={"model": "a", "input": ["fine"]})
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "adapter_changed" and "'good', 'bad'" in err["message"], err
        monkeypatch.setattr(reg, "get", real_get)
        r = client.post("/v1/classify", json={"model": "a", "input": ["fine"]})
        assert r.status_code == 200 and set(r.json()["data"][0]["probabilities"]) == {"good",
                                                                                   "bad"}


def test_metrics_label_only_the_models_served(make, store):
    """A model name nobody serves is counted as "unknown": a client making up names must not
    grow /metrics without end."""
    write_fake_adapter(store, "a")
    write_fake_adapter(store, "b", salt=1)
    with make() as (client, _, _):
        for i in range(5):
            assert client.post("/v1/completions", json={"model": f"made-up-{i}",
                                                        "prompt": "x"}).status_code == 404
        assert client.post("/v1/completions", json={"model": "a", "prompt": "x"}).status_code \
            == 200
        for pair in (["a", "b"], ["b", "a"]):  # one label for the set, whatever the order
            r = client.post("/v1/classify", json={"model": pair, "input": ["x"]})
            assert r.status_code == 200 and r.json()["model"] == ",".join(pair), r.text
        text = client.get("/metrics").text
    assert "made-up" not in text, text
    counts = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("lorastack_requests_total{")}
    assert counts['lorastack_requests_total{model="unknown",route="/v1/completions",'
                  'status="404"}'] == 5, counts
    assert counts['lorastack_requests_total{model="a",route="/v1/completions",status="200"}'] == 1
    assert counts['lorastack_requests_total{model="a,b",route="/v1/classify",status="200"}'] == 2


def test_replace_waits_for_requests_in_flight(make, store):
    write_fake_adapter(store, "live")
    with make() as (client, fake, gw):
        old = gw.registry.current["live"].identity
        client.portal.call(fake.gate.clear)
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=client.post(
            "/v1/completions", json={"model": "live", "prompt": "WAIT please"})))
        worker.start()
        assert wait_for(lambda: gw.registry.current["live"].inflight == 1)
        write_fake_adapter(store, "live", salt=3, replace=True)
        assert wait_for(lambda: gw.registry.current["live"].identity != old)
        assert ("unload", old) not in fake.events  # still answering: not unloaded
        client.portal.call(fake.gate.set)
        worker.join(10)
        assert result["r"].status_code == 200
        assert old in result["r"].json()["choices"][0]["text"]  # finished on the old weights
        assert wait_for(lambda: ("unload", old) in fake.events)
        fresh = client.post("/v1/completions", json={"model": "live", "prompt": "x"}).json()
        assert gw.registry.current["live"].identity in fresh["choices"][0]["text"]


def test_lru_eviction_and_reload(make, store):
    for name in ("a", "b", "c"):
        write_fake_adapter(store, name, salt=ord(name))
    with make(capacity=2, max_loras=1) as (client, fake, gw):
        for name in ("a", "b", "c", "a"):
            r = client.post("/v1/completions", json={"model": name, "prompt": "x"})
            assert r.status_code == 200, r.text
        assert len(fake.loaded) <= 2
        assert any(kind == "unload" for kind, _ in fake.events)
        ident_a = gw.registry.current["a"].identity
        assert [e for e in fake.events if e == ("load", ident_a)].__len__() >= 2  # reloaded
        assert "lorastack_adapter_events_total{event=\"evictions\"}" in \
            client.get("/metrics").text


def test_refused_adapters_are_not_served(make, store):
    write_fake_adapter(store, "wide", rank=64)
    write_fake_adapter(store, "alien", fingerprint="sha256:" + "cd" * 32)
    with make() as (client, fake, gw):
        assert set(gw.registry.problems) == {"wide", "alien"}
        assert not fake.loaded
        r = client.post("/v1/completions", json={"model": "wide", "prompt": "x"})
        assert r.status_code == 404 and "rank 64" in r.json()["error"]["message"]
        listing = client.get("/v1/adapters").json()
        assert "base" in listing["refused"]["alien"] or "fingerprint" in \
            listing["refused"]["alien"]


def test_auth(make, store):
    write_fake_adapter(store, "a")
    with make(api_keys=["user-key"], admin_key="admin-key") as (client, _, _):
        assert client.get("/v1/models").status_code == 401
        bad = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers=USER).status_code == 200
        assert client.post("/v1/classify", json={"model": "a", "input": "x"}).status_code == 401
        refused = client.post("/v1/adapters/unload", json={"name": "a"}, headers=USER)
        assert refused.status_code == 403
        assert client.post("/v1/adapters/unload", json={"name": "a"}).status_code == 401
        assert client.post("/v1/adapters/unload", json={"name": "a"},
                           headers=ADMIN).status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key


def test_a_failed_start_stops_the_engine_it_started(fake_base, tmp_path):
    """Whatever fails after vLLM is up (here a store path that is a file) stops it: a gateway
    that does not start leaves no engine behind, and says what failed."""
    import asyncio

    class Process:  # what the gateway's own VllmProcess offers it
        stopped = False

        def stop(self):
            Process.stopped = True

        def exit_code(self):
            return None if not Process.stopped else -1

    fake = FakeVllm()
    engine = Engine("http://fake-vllm", transport=httpx.ASGITransport(fake.app),
                    process=Process())
    not_a_folder = tmp_path / "store"
    not_a_folder.write_text("a file, not a folder")
    gw = Gateway(ServeSettings(store=not_a_folder, work_dir=tmp_path / "work"),
                 engines=[engine], base=fake_base)
    with pytest.raises(OSError, match="store"):
        asyncio.run(gw.start())
    assert Process.stopped
    assert (tmp_path / "work").is_dir()  # a given work dir is the user's: never removed


def test_an_ensemble_file_with_a_name_no_model_may_have_is_refused_not_fatal(make, store):
    """A copy made by hand ("x (copy).ensemble.json") is listed as refused, with the rule;
    the gateway starts, serves the rest and keeps watching the store."""
    write_fake_adapter(store, "a")
    (store.root / "x (copy).ensemble.json").write_text("{}")
    with make() as (client, _, gw):
        assert "x (copy)" in gw.registry.problems
        assert "name" in gw.registry.problems["x (copy)"]
        write_fake_adapter(store, "b", salt=1)  # the watcher still runs
        assert wait_for(lambda: "b" in gw.registry.current)
        assert client.post("/v1/completions", json={"model": "b", "prompt": "x"}).status_code \
            == 200


def test_the_watcher_serves_the_rest_of_a_pass_when_one_adapter_fails(make, store,
                                                                      monkeypatch):
    """An unexpected error on one store entry (here the copy for serving hits a full disk)
    is listed against that name; the other entries of the same pass are served."""
    import errno

    with make() as (client, _, gw):
        reg = gw.registry
        real = reg._snapshot

        def snapshot(adapter):
            if adapter.name == "x":
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(adapter)

        monkeypatch.setattr(reg, "_snapshot", snapshot)
        for name, salt in (("x", 1), ("y", 2)):
            write_fake_adapter(store, name, salt=salt)
        assert wait_for(lambda: "y" in reg.current and "x" in reg.problems)
        assert "No space left" in reg.problems["x"] and "x" not in reg.current
        r = client.post("/v1/adapters/load", json={"name": "x"}, headers=ADMIN)
        assert r.status_code == 422 and "No space left" in r.json()["error"]["message"], r.text


def test_an_engine_the_gateway_dropped_fails_as_an_engine_error():
    """An upstream that left (--upstream-dir) has its client closed: what still reaches it
    (a retry, an unload of what it held) is an EngineError the routes answer 503, not a 500."""
    import asyncio

    from lorastack.serve.engine import EngineError

    engine = Engine("http://fake-vllm", transport=httpx.ASGITransport(FakeVllm().app))

    async def main():
        assert await engine.healthy()
        engine.reason = "deregistered"
        await engine.aclose()
        assert not await engine.healthy() and not engine.up
        for call in (engine.post_json("/v1/completions", {"model": "x", "prompt": "y"}),
                     engine.unload_lora("a@1234abcd")):
            with pytest.raises(EngineError, match="has left this gateway") as info:
                await call
            assert info.value.status == 503

    asyncio.run(main())


def test_a_load_by_hand_loses_to_a_removal_made_while_it_prepared(make, store, monkeypatch):
    """POST /v1/adapters/load copies and hashes outside the registry's lock; an adapter removed
    from the store meanwhile stays removed (404), not served from a copy of what is gone."""
    write_fake_adapter(store, "x")
    with make() as (client, _, gw):
        reg = gw.registry
        assert client.post("/v1/adapters/unload", json={"name": "x"}).status_code == 200
        entered, release = threading.Event(), threading.Event()
        real = reg._prepare

        def prepare(name):
            served = real(name)
            entered.set()
            release.wait(10)
            return served

        monkeypatch.setattr(reg, "_prepare", prepare)
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=client.post(
            "/v1/adapters/load", json={"name": "x"})))
        worker.start()
        assert entered.wait(10)
        store.remove("x")
        assert wait_for(lambda: reg._removals["x"] == 2)  # the unload, then the store's
        release.set()
        worker.join(10)
        assert result["r"].status_code == 404, result["r"].text
        assert "removed from the store or unloaded" in result["r"].json()["error"]["message"]
        assert "x" not in reg.current
        assert client.post("/v1/completions", json={"model": "x", "prompt": "y"}) \
            .status_code == 404


def test_an_engine_too_slow_to_answer_is_a_504_that_names_the_limit():
    """Past LORASTACK_REQUEST_TIMEOUT_S the answer says the engine was slow (504), not that it
    is unreachable and being restarted."""
    import asyncio
    import socket

    from lorastack.serve.engine import EngineError

    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = listener.getsockname()[1]
    engine = Engine(f"http://127.0.0.1:{port}", timeout_s=0.3)

    async def main():
        with pytest.raises(EngineError) as info:
            await engine.post_json("/v1/completions", {"model": "x", "prompt": "y"})
        await engine.aclose()
        return info.value

    try:
        err = asyncio.run(main())
    finally:
        listener.close()
    assert err.status == 504 and "did not answer in time" in str(err), err
    assert "LORASTACK_REQUEST_TIMEOUT_S" in str(err)


def test_exposed_without_keys_refuses_to_start():
    with pytest.raises(SettingsError, match="API keys"):
        ServeSettings(host="0.0.0.0").check_exposure()
    ServeSettings(host="0.0.0.0", api_keys="a,b", admin_key="c").check_exposure()
    assert ServeSettings(api_keys="a, b").api_keys == ["a", "b"]


def test_limits_and_malformed_requests(make, store):
    write_fake_adapter(store, "a")
    with make() as (client, _, _):
        def err(r, status):
            assert r.status_code == status, r.text
            body = r.json()["error"]
            assert body["message"] and body["type"] and body["code"]
            return body

        long = "word " * 200
        assert err(client.post("/v1/completions", json={"model": "a", "prompt": long}),
                   400)["code"] == "prompt_too_long"
        assert err(client.post("/v1/chat/completions", json={
            "model": "a", "messages": [{"role": "user", "content": long}]}), 400)["code"] \
            == "prompt_too_long"
        assert err(client.post("/v1/completions", json={"model": "a", "prompt": "x",
                                                        "max_tokens": 999}), 400)["code"] \
            == "max_tokens_too_large"
        assert err(client.post("/v1/completions", json={"model": "a", "prompt": ["x"] * 5}),
                   400)["code"] == "batch_too_large"
        assert err(client.post("/v1/classify", json={"model": "a", "input": ["x"] * 5}),
                   400)["code"] == "batch_too_large"
        assert err(client.post("/v1/classify", json={"model": "a", "input": long}),
                   400)["code"] == "prompt_too_long"
        assert err(client.post("/v1/completions", content=b"x" * 5000,
                               headers={"content-type": "application/json"}),
                   413)["code"] == "body_too_large"
        assert err(client.post("/v1/completions", content=b"{not json"), 400)["code"] \
            == "invalid_json"
        assert err(client.post("/v1/completions", json=[1, 2]), 400)["code"] == "invalid_json"
        assert err(client.post("/v1/classify", json={"model": "a"}), 422)["code"] \
            == "invalid_request"
        assert err(client.post("/v1/completions", json={"prompt": "x"}), 400)["code"] \
            == "missing_model"
        unknown = err(client.post("/v1/classify", json={"model": "zz", "input": "x"}), 404)
        assert "Available: smollm2-135m, a" in unknown["message"]
        base = err(client.post("/v1/classify", json={"model": "smollm2-135m", "input": "x"}),
                   400)
        assert base["code"] == "not_a_classifier" and "is the base model" in base["message"]
        # vLLM's runtime LoRA routes are never forwarded
        assert err(client.post("/v1/load_lora_adapter", json={"lora_name": "x",
                                                               "lora_path": "/"}), 404)


def test_streaming_is_relayed_with_public_name(make, store):
    write_fake_adapter(store, "gen", task="generation")
    with make() as (client, _, _):
        with client.stream("POST", "/v1/completions", json={
                "model": "gen", "prompt": "x", "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert len(lines) == 4 and all('"model": "gen"' in x for x in lines[:-1])


def test_engine_down_answers_503(make, store):
    write_fake_adapter(store, "a")
    with make() as (client, fake, gw):
        fake.healthy = False  # so that the supervisor's checks agree
        gw.engines[0].up, gw.engines[0].reason = False, "vLLM exited (code -9); restarting it"
        r = client.post("/v1/completions", json={"model": "a", "prompt": "x"})
        assert r.status_code == 503 and "restarting" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "5"
        assert client.get("/health").status_code == 503


def test_upstreams_get_requests_for_the_adapters_they_hold(fake_base, store, tmp_path):
    write_fake_adapter(store, "a")
    write_fake_adapter(store, "b", salt=1)
    fakes = [FakeVllm(), FakeVllm()]
    engines = [Engine(f"http://up{i}", transport=httpx.ASGITransport(f.app))
               for i, f in enumerate(fakes)]
    settings = ServeSettings(store=store.root, work_dir=tmp_path / "work",
                             upstream=["http://up0", "http://up1"])
    gw = Gateway(settings, engines=engines, base=fake_base)
    with TestClient(create_app(gateway=gw)) as client:
        homes = {name: gw.registry.current[name].identity for name in ("a", "b")}
        assert [set(f.loaded) for f in fakes] == [{homes["a"]}, {homes["b"]}]  # spread out
        for _ in range(3):
            for name in ("a", "b"):
                assert client.post("/v1/completions", json={"model": name, "prompt": "x"}
                                   ).status_code == 200
        assert set(fakes[0].seen_models) == {homes["a"]}
        assert set(fakes[1].seen_models) == {homes["b"]}
