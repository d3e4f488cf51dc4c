"""A request that kills the real vLLM engine: answered 500, refused afterwards; the requests in
flight with it are retried once on the restarted engine (serve/crashes.py).

The killer is the one vLLM 0.32's own CPU LoRA ops die on (completions with `prompt_logprobs`
on an adapter), so lorastack's plugin is switched off for this module's vLLM
(LORASTACK_VLLM_PATCHES=0, inherited by the child and by its restart).
"""

from __future__ import annotations

import threading
import time

import pytest
from serve_helpers import random_adapter, serve_in_thread

from lorastack.adapters.store import AdapterStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

LONG = {"model": "gen", "prompt": "Tell me about the sea.", "max_tokens": 48, "min_tokens": 48,
        "temperature": 0}
# its prompt's rows (~40) differ from the step's sampled rows, which is what vLLM's ops trip on
KILLER = {"model": "gen", "max_tokens": 2, "prompt_logprobs": 1,
          "prompt": "The sea is wide and deep, and the ships that sail on it carry people and "
                    "goods from one harbour to another, by day and by night, in every season."}
TEXTS = [f"review number {i}: the medicine worked well and I slept better" for i in range(16)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model):
    root = tmp_path_factory.mktemp("engine-crash")
    store = AdapterStore(root / "store")
    random_adapter(store, "gen", base_model, seed=0, tmp=root)
    random_adapter(store, "cls", base_model, seed=1, tmp=root, labels=("yes", "no"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORASTACK_VLLM_PATCHES", "0")
        with serve_in_thread(store, root, capacity=4, max_loras=2, max_batch=32,
                             max_tokens=64) as (client, gw):
            yield client, gw


def restarts(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("lorastack_vllm_restarts_total "):
            return float(line.split()[1])
    raise AssertionError("no restart counter in /metrics")


def test_killer_is_answered_and_refused_others_are_retried(server):
    client, gw = server
    log = gw.engines[0].process.log_file
    assert "lorastack vLLM plugin: off" in log.read_text(errors="replace")
    # every shape but the killer's has answered well once
    assert client.post("/v1/completions", json=dict(LONG, max_tokens=2, min_tokens=2)
                       ).status_code == 200
    first = client.post("/v1/classify", json={"model": "cls", "input": TEXTS[:2]})
    assert first.status_code == 200, first.text
    assert restarts(client) == 0

    answers: dict[str, object] = {}

    def send(key, path, body):
        answers[key] = client.post(path, json=body)

    threads = [threading.Thread(target=send, args=("long", "/v1/completions", LONG)),
               threading.Thread(target=send, args=("classify", "/v1/classify",
                                                   {"model": "cls", "input": TEXTS}))]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both in the engine: the long one decodes for several seconds
    killer = client.post("/v1/completions", json=KILLER)
    for t in threads:
        t.join(600)

    assert killer.status_code == 500, killer.text
    error = killer.json()["error"]
    assert error["code"] == "engine_died" and "prompt_logprobs" in error["message"], error
    assert "EngineCore encountered a fatal error" in log.read_text(errors="replace")
    assert restarts(client) == 1
    for key in ("long", "classify"):  # in flight with the killer: retried once, answered
        assert answers[key].status_code == 200, (key, answers[key].text)
    assert answers["long"].json()["usage"]["completion_tokens"] == 48
    assert len(answers["classify"].json()["data"]) == len(TEXTS)

    # the same shape again is refused before it reaches the engine, and the engine lives
    again = client.post("/v1/completions", json=dict(KILLER, prompt="Another prompt"))
    assert again.status_code == 500
    assert again.json()["error"]["code"] == "refused_engine_killer"
    health = client.get("/health").json()
    assert health["engine_deaths"] == 1 and len(health["refused_shapes"]) == 1
    assert "prompt_logprobs" in health["refused_shapes"][0]["shape"]
    ok = client.post("/v1/completions", json=dict(LONG, max_tokens=2, min_tokens=2))
    assert ok.status_code == 200
    time.sleep(3)  # the supervisor would have seen a death by now
    assert restarts(client) == 1
