"""`lorastack serve --backend ray` for real (serve/ray_app.py): a local Ray cluster, a vLLM
replica as a Serve deployment, two gateways as Serve's ingress, started as the README says. (One
replica: beside the suite's other servers, two overrun 24 GB and Ray's memory monitor kills
them; alone, two pass.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_helpers import random_adapter, wait_for

from lorastack.adapters.store import AdapterStore

pytest.importorskip("ray.serve")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

KEY = {"Authorization": "Bearer key"}
TEXTS = ["Works great, no side effects.", "It made me sick.", "Some days are better."]
LABELS = ("positive", "negative", "neutral")


def test_ray_serves_adapters_over_replicas_behind_gateways(tmp_path, base_model):
    from lorastack.serve.leases import registered
    from lorastack.serve.vllm_proc import free_port
    from lorastack.train.assess import adapter_probabilities

    store = AdapterStore(tmp_path / "store")
    random_adapter(store, "sentiment", base_model, seed=5, tmp=tmp_path, labels=LABELS)
    random_adapter(store, "writer", base_model, seed=3, tmp=tmp_path)
    port, work = free_port(), tmp_path / "work"
    with open(tmp_path / "serve.log", "wb") as log:  # the child keeps its own descriptor
        driver = subprocess.Popen(
            [sys.executable, "-m", "lorastack", "serve", "--backend", "ray", "--replicas", "1",
             "--gateways", "2", "--store", str(store.root), "--work-dir", str(work), "--port",
             str(port), "--api-key", "key", "--admin-key", "admin", "--kv-cache-gb", "1",
             "--max-loras", "2", "--capacity", "2"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "LORASTACK_POLL_INTERVAL_S": "0.25", "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"

    def health() -> dict:
        try:
            return httpx.get(f"{url}/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return {}

    started = time.monotonic()
    try:
        # Ray's proxy sends each /health to either gateway: both see the replica when a run of
        # answers in a row says so
        up = lambda: all(len([e for e in health().get("vllm", []) if e["up"]]) == 1
                         for _ in range(8))
        assert wait_for(lambda: up() or driver.poll() is not None, timeout=600) and up(), \
            (tmp_path / "serve.log").read_text(errors="replace")[-4000:]
        print(f"\nRay app up in {time.monotonic() - started:.0f} s")
        replicas = registered(work / "upstreams")
        assert len(replicas) == 1
        with httpx.Client(base_url=url, timeout=300, headers=KEY) as client:
            models = {m["id"] for m in client.get("/v1/models").json()["data"]}
            assert {"smollm2-135m", "sentiment", "writer"} <= models
            got = client.post("/v1/classify", json={"model": "sentiment", "input": TEXTS})
            assert got.status_code == 200, got.text
            want = adapter_probabilities(store.path("sentiment"), TEXTS)
            for item, expected in zip(got.json()["data"], want, strict=True):
                assert item["probabilities"] == pytest.approx(expected, abs=1e-3)
            failures: list[str] = []
            stop = threading.Event()

            def load(model: str) -> None:  # through Ray's proxy, to either gateway replica
                with httpx.Client(base_url=url, timeout=300, headers=KEY) as c:
                    while not stop.is_set():
                        r = c.post("/v1/completions", json={"model": model, "prompt": "Hi",
                                                            "max_tokens": 3})
                        if r.status_code != 200 or r.json()["model"] != model:
                            failures.append(f"{model}: {r.status_code} {r.text[:200]}")

            threads = [threading.Thread(target=load, args=(m,)) for m in ("writer", "writer")]
            for t in threads:
                t.start()
            # an adapter written while the app runs is served by its plain name
            random_adapter(store, "late", base_model, seed=4, tmp=tmp_path)
            assert wait_for(lambda: client.post("/v1/completions", json={
                "model": "late", "prompt": "Hi", "max_tokens": 3}).status_code == 200,
                timeout=60)
            time.sleep(2)
            stop.set()
            for t in threads:
                t.join(120)
            assert not failures, failures[:3]
            engines = health()["vllm"]
            assert 2 <= sum(e["adapters_loaded"] for e in engines) <= 3  # capacity 2, 3 adapters
    finally:
        driver.send_signal(signal.SIGTERM)  # as Ctrl-C: Serve stops the replicas, they stop vLLM
        try:
            code = driver.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
            code = None
    assert code == 0, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
    for replica in replicas:  # no vLLM is left behind
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{replica}/health", timeout=2)
