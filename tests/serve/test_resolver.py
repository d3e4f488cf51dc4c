"""lorastack's LoRA resolver for vLLM (serve/vllm_plugin/resolver.py, endpoint.py): adapters
from a store, local or behind an fsspec URL, resolved by name or name@hash with the store's
checks; then a real vLLM started as a user would, serving an adapter written after it started."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest
from serve_helpers import FAKE_FINGERPRINT, random_adapter, write_fake_adapter

from lorastack.adapters.store import AdapterStore
from lorastack.serve.vllm_plugin import endpoint, resolver
from lorastack.serve.vllm_plugin.resolver import Refused, StoreResolver

pytest.importorskip("vllm")


@pytest.fixture
def stores(tmp_path, base_model):
    store = AdapterStore(tmp_path / "store")
    good = random_adapter(store, "good", base_model, seed=0, tmp=tmp_path)
    write_fake_adapter(store, "alien", fingerprint=FAKE_FINGERPRINT, tmp=tmp_path)  # other base
    return store, good


def test_resolves_a_pinned_checked_copy_by_name_or_version(stores, tmp_path, base_model):
    store, good = stores
    r = StoreResolver(str(store.root), tmp_path / "cache", base=base_model.name)
    digest = good.content_hash().split(":", 1)[1]
    path = r.fetch(base_model.path, "good").path
    assert path == tmp_path / "cache" / f"good@{digest[:16]}" / "good"
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    assert r.fetch(base_model.path, f"good@{digest[:8]}").path == path  # one version, one dir
    assert r.fetch(base_model.path, f"good@sha256:{digest}").path == path
    with pytest.raises(Refused, match=rf"holds good at content hash {digest[:16]}, not "
                                      r"deadbeef: ask for good .* or good@"):
        r.fetch(base_model.path, "good@deadbeef")
    with pytest.raises(Refused, match=r"'alien' .* trained on base 'smollm2-135m' with weights "
                                      r"abababababab, but the base model at hand has weights"):
        r.fetch(base_model.path, "alien")
    with pytest.raises(Refused, match=r"no adapter of this name in the store \(available: "
                                      r"alien, good\)"):
        r.fetch(base_model.path, "nobody")
    with pytest.raises(Refused, match="the name is not plain"):
        r.fetch(base_model.path, "../etc")


def test_resolve_lora_answers_vllm_and_remembers_why_it_refused(stores, tmp_path, base_model):
    from vllm.lora.request import LoRARequest

    store, _ = stores
    r = StoreResolver(str(store.root), tmp_path / "cache", base=base_model.name)
    request = asyncio.run(r.resolve_lora(str(base_model.path), "good"))
    assert isinstance(request, LoRARequest) and request.lora_name == "good"
    assert Path(request.lora_path).parent.name.startswith("good@")
    assert asyncio.run(r.resolve_lora(str(base_model.path), "alien")) is None
    assert "trained on base 'smollm2-135m'" in r.refusals["alien"] and "good" not in r.refusals


def test_a_remote_store_is_downloaded_and_checked_the_same_way(stores, tmp_path, base_model):
    import fsspec

    store, good = stores
    fs = fsspec.filesystem("memory")
    for name in ("good", "alien"):
        for file in store.path(name).iterdir():
            fs.pipe(f"/remote-store/{name}/{file.name}", file.read_bytes())
    fs.pipe("/remote-store/pickled/adapter_model.bin", b"not safetensors")
    fs.pipe("/remote-store/bare/adapter_config.json", b"{}")
    r = StoreResolver("memory://remote-store", tmp_path / "cache", base=base_model.name)
    path = r.fetch(base_model.path, "good").path
    assert AdapterStore(path.parent).resolve("good").content_hash() == good.content_hash()
    with pytest.raises(Refused, match=r"memory://remote-store/alien/manifest.json\): it was "
                                      r"trained on base 'smollm2-135m'"):
        r.fetch(base_model.path, "alien")
    with pytest.raises(Refused, match="no adapter 'nobody' in the store memory://remote-store"):
        r.fetch(base_model.path, "nobody")
    with pytest.raises(Refused, match=r"pickled weights \(adapter_model.bin\) and no "
                                      r"adapter_model.safetensors; lorastack loads safetensors"):
        r.fetch(base_model.path, "pickled")
    with pytest.raises(Refused, match="memory://remote-store/bare.*manifest.json is missing"):
        r.fetch(base_model.path, "bare")
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith("download")]
    assert leftovers == []  # downloads are removed once pinned (or refused)


def test_the_environment_turns_it_on(monkeypatch, tmp_path):
    monkeypatch.delenv(resolver.STORE_ENV, raising=False)
    assert resolver.from_env() is None
    monkeypatch.setenv(resolver.STORE_ENV, f"file://{tmp_path}/store")
    monkeypatch.setenv(resolver.RANK_ENV, "32")
    monkeypatch.setenv(resolver.CACHE_ENV, str(tmp_path / "c"))
    r = resolver.from_env()
    assert (r.store, r.cache, r.limits.max_rank) == (f"{tmp_path}/store", tmp_path / "c", 32)


def test_the_gateways_own_vllm_never_gets_a_resolver(monkeypatch, tmp_path):
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_proc import VllmProcess

    monkeypatch.setenv(resolver.STORE_ENV, str(tmp_path))
    proc = VllmProcess(ServeSettings(store=tmp_path), tmp_path, "base", tmp_path / "log")
    assert resolver.STORE_ENV not in proc.environment()


def test_vllms_404_carries_the_refusal_reason(monkeypatch):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: dict):
        if body["model"] == "base":
            return {"ok": True}
        return JSONResponse(status_code=404, content={"error": {
            "message": f"The model `{body['model']}` does not exist. Valid aliases: base.",
            "type": "NotFoundError", "param": "model", "code": 404}})

    endpoint.LorastackEndpoints().attach_router(app)
    fake = StoreResolver("/nowhere", Path("/nowhere"))
    fake.refusals["alien"] = "adapter 'alien' was trained on another base model"
    monkeypatch.setattr(resolver, "ACTIVE", fake)
    with TestClient(app) as client:
        refused = client.post("/v1/completions", json={"model": "alien"})
        assert refused.status_code == 404
        message = refused.json()["error"]["message"]
        assert message.startswith("The model `alien` does not exist.")
        assert message.endswith("lorastack's resolver refused it: adapter 'alien' was trained "
                                "on another base model")
        other = client.post("/v1/completions", json={"model": "other"})
        assert other.status_code == 404 and "lorastack" not in other.text
        assert client.post("/v1/completions", json={"model": "base"}).json() == {"ok": True}


def test_the_replica_classify_route_says_what_is_missing(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    endpoint.LorastackEndpoints().attach_router(app)
    monkeypatch.setattr(resolver, "ACTIVE", None)
    with TestClient(app) as client:
        off = client.post("/v1/classify", json={"model": "x", "input": "y"})
        assert off.status_code == 503 and resolver.STORE_ENV in off.json()["error"]["message"]
        app.state.lorastack = endpoint.Replica("http://127.0.0.1:9", Path("/nowhere"), None)
        monkeypatch.setattr(resolver, "ACTIVE", StoreResolver("/nowhere", Path("/nowhere")))
        bad = client.post("/v1/classify", json={"model": "x"})
        assert bad.status_code == 422 and "input" in bad.json()["error"]["message"]
        garbled = client.post("/v1/classify", content=b"{not json")
        assert garbled.status_code == 400 and "not a JSON object" in garbled.text
        from lorastack.serve.settings import ServeSettings

        limit = ServeSettings().max_batch  # the gateway's own limit
        many = client.post("/v1/classify", json={"model": "x", "input": ["a"] * (limit + 1)})
        assert many.status_code == 400 and f"batch limit {limit};" in many.text


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_vllm_serves_a_store_adapter_written_after_it_started(tmp_path, base_model):
    """`python -m vllm.entrypoints.openai.api_server --enable-lora` with the environment the
    README gives: an adapter that reaches the store later is served by name and by version; a
    refused one gets vLLM's 404 with lorastack's reason; vLLM lives on."""
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_proc import ChildProcess, VllmProcess, free_port

    store = AdapterStore(tmp_path / "store")
    store.root.mkdir()
    port = free_port()
    command = VllmProcess(ServeSettings(store=store.root, vllm_port=port, max_loras=2,
                                        capacity=2, max_model_len=1024),
                          base_model.path, "smollm2-135m", tmp_path / "vllm.log").args
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    vllm = ChildProcess("vLLM", port, tmp_path / "vllm.log", command, env={
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lorastack",
        resolver.STORE_ENV: str(store.root), resolver.CACHE_ENV: str(tmp_path / "cache"),
        resolver.BASE_ENV: base_model.name, "VLLM_CPU_KVCACHE_SPACE": "1"})
    asyncio.run(vllm.start().wait_healthy(600))
    try:
        late = random_adapter(store, "late", base_model, seed=3, tmp=tmp_path)
        write_fake_adapter(store, "alien", fingerprint=FAKE_FINGERPRINT, tmp=tmp_path)
        random_adapter(store, "wide", base_model, seed=4, tmp=tmp_path, rank=32)
        random_adapter(store, "sentiment", base_model, seed=5, tmp=tmp_path,
                       labels=("positive", "negative", "neutral"))

        def complete(model: str) -> httpx.Response:
            return httpx.post(f"{vllm.url}/v1/completions", timeout=300, json={
                "model": model, "prompt": "The weather today is", "max_tokens": 4,
                "temperature": 0})

        base = complete("smollm2-135m").json()["choices"][0]["text"]
        answer = complete("late")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "late"
        assert answer.json()["choices"][0]["text"] != base  # the adapter's weights are in play
        version = f"late@{late.content_hash().split(':', 1)[1][:12]}"
        again = complete(version)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"] == answer.json()["choices"][0]["text"]
        refused = complete("alien")
        assert refused.status_code == 404
        assert "lorastack's resolver refused it" in refused.json()["error"]["message"]
        assert "trained on base 'smollm2-135m'" in refused.json()["error"]["message"]
        assert "lorastack's resolver refused it" in complete("nobody").json()["error"]["message"]
        wide = complete("wide")  # rank 32 > --max-lora-rank 16: vLLM's own check says no
        assert wide.status_code == 400 and "could not be loaded" in wide.text
        assert httpx.get(f"{vllm.url}/health").status_code == 200
        models = [m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]]
        assert {"late", version} <= set(models)
        # /v1/classify on the replica itself: the gateway's scoring path, the trainer's numbers
        from lorastack.train.assess import adapter_probabilities

        texts = ["Works great, no side effects.", "It made me sick.", "Some days are better."]
        classified = httpx.post(f"{vllm.url}/v1/classify", timeout=300, json={
            "model": "sentiment", "input": texts, "top_k": 2})
        assert classified.status_code == 200, classified.text
        body = classified.json()
        assert body["labels"] == ["positive", "negative", "neutral"] and body["usage"]["prompt_tokens"]
        want = adapter_probabilities(store.path("sentiment"), texts)
        for item, expected in zip(body["data"], want, strict=True):
            assert item["probabilities"] == pytest.approx(expected, abs=1e-3)
            assert [t["label"] for t in item["top"]] == sorted(expected, key=lambda k: -expected[k])[:2]
        not_cls = httpx.post(f"{vllm.url}/v1/classify", json={"model": "late", "input": "x"})
        assert not_cls.status_code == 400 and "generation adapter" in not_cls.text
        fieldless = httpx.post(f"{vllm.url}/v1/classify", json={"model": "sentiment",
                                                                 "input": [{"drug": "x"}]})
        assert fieldless.status_code == 422 and "lacks the field(s) text" in fieldless.text
        refused_cls = httpx.post(f"{vllm.url}/v1/classify", json={"model": "alien", "input": "x"})
        assert refused_cls.status_code == 404 and "trained on base" in refused_cls.text
        log = (tmp_path / "vllm.log").read_text(errors="replace")
        assert "lorastack vLLM plugin: store resolver over" in log
        assert json.loads((store.path("late") / "manifest.json").read_text())["name"] == "late"
    finally:
        vllm.stop(30)
