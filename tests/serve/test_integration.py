"""The gateway for real: adapters trained on the real base model, the real vLLM child, real HTTP.

vLLM starts once for the module (the `server` fixture); the tests run in file order and the last
one kills vLLM and waits for the gateway to bring it back.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from serve_helpers import serve_in_thread

from lorastack.adapters.store import AdapterStore
from lorastack.train.assess import adapter_probabilities as trainer_probabilities

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

KEY, ADMIN = "test-key", "test-admin"
TEXTS = ["This medicine works great, my pain is gone and no side effects.",
         "Terrible side effects, it made me sick and did not help at all.",
         "It is okay I guess, some days better than others."]
CLS_TASK = {"type": "classification", "prompt": "{text}", "system": "Classify the sentiment.",
            "labels": ["positive", "negative", "neutral"]}
DATA = {"source": "drug-reviews", "limit_train": 16, "limit_eval": 8, "max_length": 160}
LORA = {"r": 8, "alpha": 16, "layers": [27, 28, 29]}
# Labels answered with several tokens, two of them sharing a prefix ("Sci/Tech"-like words):
# the scoring path that once killed vLLM's engine (prompt_logprobs on CPU LoRA).
MULTI_TASK = {**CLS_TASK, "label_words": {"positive": "good/positive", "negative":
                                          "Sci/Tech negative", "neutral": "good/neutral"}}


def _train(root: Path, name: str, task: dict, data: dict = DATA, **training):
    from lorastack.train import train

    return train({"name": name, "base": "smollm2-135m", "store": str(root / "staging"),
                  "runs_dir": str(root / "runs"), "quantization": "none", "task": task,
                  "data": data, "lora": LORA,
                  "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2,
                               "save_every": 2, **training}})


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_model):
    import uvicorn

    from lorastack.serve.app import create_app
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_proc import listening_socket

    root = tmp_path_factory.mktemp("serving")
    _train(root, "cls-a", CLS_TASK)
    _train(root, "cls-b", CLS_TASK, seed=1, lr=3e-3)
    # cls-a's data and split: an ensemble with it; trained from the kept output of the frozen
    # layers 0-26 (train/frozen.py), which are kept only once proven on the real model
    _train(root, "cls-c", CLS_TASK, lr=3e-3, cache_frozen_layers=True)
    from lorastack.train import frozen

    assert any(key[1] == 27 for key in frozen._built), "cls-c trained through every layer"
    _train(root, "cls-multi", MULTI_TASK, seed=2, lr=3e-3)
    _train(root, "gen", {"type": "generation", "prompt": "{text}", "target_field": "condition",
                         "system": "Name the condition treated.", "max_new_tokens": 4},
           data={**DATA, "limit_eval": 3}, lr=5e-3, max_steps=3, eval_every=3, save_every=3)
    staging, store = AdapterStore(root / "staging"), AdapterStore(root / "served")
    for name in ("cls-a", "cls-b", "cls-c", "cls-multi", "gen"):
        staging.copy(name, name, into=store)
    sock = listening_socket()
    port = sock.getsockname()[1]
    settings = ServeSettings(store=store.root, port=port, capacity=2, max_loras=2,
                             api_keys=[KEY], admin_key=ADMIN, work_dir=root / "work",
                             poll_interval_s=0.25, max_batch=8, max_tokens=64)
    app = create_app(settings)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, args=([sock],), daemon=True)
    started = time.monotonic()
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "the gateway failed to start (see the output above)"
        time.sleep(0.5)
    gw = app.state.gateway
    print(f"\ngateway up in {time.monotonic() - started:.0f} s (vLLM healthy after "
          f"{gw.startup_s:.0f} s)")
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {KEY}"}) \
            as client:
        yield SimpleNamespace(url=url, client=client, gw=gw, store=store, staging=staging)
    uv.should_exit = True
    thread.join(60)


def classify(srv, model, texts):
    r = srv.client.post("/v1/classify", json={"model": model, "input": texts})
    assert r.status_code == 200, r.text
    return r.json()


def openai_client(srv):
    import openai

    return openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY)


class Load:
    """Requests in a loop on other threads, counting failures, while a test swaps adapters."""

    def __init__(self, srv, models):
        self.srv, self.models, self.stop = srv, models, threading.Event()
        self.codes: list[int] = []
        self.failures: list[str] = []
        self.pool = ThreadPoolExecutor(len(models))

    def _loop(self, model):
        with httpx.Client(base_url=self.srv.url, timeout=300,
                          headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not self.stop.is_set():
                if model.startswith("cls"):
                    r = client.post("/v1/classify", json={"model": model, "input": TEXTS[:2]})
                else:
                    r = client.post("/v1/completions", json={"model": model, "prompt": "Hi",
                                                             "max_tokens": 4})
                self.codes.append(r.status_code)
                if r.status_code != 200:
                    self.failures.append(f"{model}: {r.status_code} {r.text[:300]}")

    def __enter__(self):
        self.futures = [self.pool.submit(self._loop, m) for m in self.models]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for f in self.futures:
            f.result(300)
        self.pool.shutdown()


def wait_for(predicate, timeout=30.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def test_models_listed_for_the_openai_client(server):
    models = {m.id: m for m in openai_client(server).models.list().data}
    assert {"smollm2-135m", "cls-a", "cls-b", "gen"} <= set(models)
    assert models["cls-a"].model_extra["labels"] == ["positive", "negative", "neutral"]
    assert models["gen"].model_extra["task"] == "generation"
    # /v1/classify through the same client, as the README shows
    result = openai_client(server).post("/classify", cast_to=object,
                                        body={"model": "cls-a", "input": [TEXTS[0]]})
    assert result["data"][0]["label"] in models["cls-a"].model_extra["labels"]


def test_the_engine_runs_under_glibc_even_when_the_gateway_has_tcmalloc(server, monkeypatch):
    """The gateway runs under tcmalloc (the `lorastack` command's allocator), vLLM under glibc's
    malloc, where it measured faster with adapters (adapters/allocator.py)."""
    import psutil

    from lorastack.adapters import allocator

    engine = server.gw.engines[0]
    monkeypatch.setenv("LD_PRELOAD", f"{allocator.find_tcmalloc()}:/opt/x/libkeep.so")
    env = engine.process.environment()
    assert env["LD_PRELOAD"] == "/opt/x/libkeep.so"
    monkeypatch.setenv("LD_PRELOAD", str(allocator.find_tcmalloc()))
    assert "LD_PRELOAD" not in engine.process.environment()
    root = psutil.Process(engine.process.pid)
    procs = [root, *root.children(recursive=True)]
    assert len(procs) >= 2  # the API server and its EngineCore
    under = [p.name() for p in procs if any("libtcmalloc" in m.path for m in p.memory_maps())]
    assert not under, f"under tcmalloc: {under}"


def test_the_model_runs_inside_the_engine_core(server):
    """lorastack serve's CPU layout (ServeSettings.vllm_threads=all): the API server and one
    EngineCore that runs the model, no worker process of its own (bench/engine_tuning.py)."""
    import psutil

    engine = server.gw.engines[0]
    assert engine.process.environment()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    children = psutil.Process(engine.process.pid).children(recursive=True)
    # (the other child is multiprocessing's resource tracker, a plain `python`)
    vllm = [p.name() for p in children if p.name().startswith("VLLM::")]
    assert vllm == ["VLLM::EngineCore"], vllm


def test_generation_and_chat_base_and_adapter(server):
    oc = openai_client(server)
    messages = [{"role": "system", "content": "Name the condition treated."},
                {"role": "user", "content": TEXTS[0] + " I take it for my back."}]
    answers = {}
    for model in ("smollm2-135m", "gen"):
        chat = oc.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                          temperature=0, logprobs=True, top_logprobs=1)
        assert chat.model == model and chat.choices[0].message.content
        answers[model] = (chat.choices[0].message.content,
                          [t.logprob for t in chat.choices[0].logprobs.content])
        text = oc.completions.create(model=model, prompt="The capital of France is",
                                     max_tokens=6, temperature=0)
        assert text.model == model and text.choices[0].text
    # the adapter changes the answer: its text, or at least the probabilities behind it
    assert answers["gen"] != answers["smollm2-135m"]
    print(f"\nbase: {answers['smollm2-135m'][0]!r}\nadapter: {answers['gen'][0]!r}")


def test_streaming_token_by_token(server):
    oc = openai_client(server)
    kwargs = {"model": "gen", "messages": [{"role": "user", "content": TEXTS[1]}],
              "max_tokens": 12, "temperature": 0}
    whole = oc.chat.completions.create(**kwargs).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in
              oc.chat.completions.create(stream=True, **kwargs) if c.choices]
    assert len([c for c in chunks if c]) > 2  # arrives in pieces, not at the end
    assert "".join(chunks) == whole


def test_classify_single_batch_and_ensemble(server):
    classify(server, "cls-a", TEXTS[0])  # warm
    for texts in (TEXTS[0], TEXTS):
        started = time.perf_counter()
        classify(server, "cls-a", texts)
        print(f"\nclassify, {1 if texts is TEXTS[0] else len(texts)} input(s): "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")
    one = classify(server, "cls-a", TEXTS[0])
    assert len(one["data"]) == 1 and one["labels"] == ["positive", "negative", "neutral"]
    probs = one["data"][0]["probabilities"]
    assert abs(sum(probs.values()) - 1) < 1e-6
    batch = classify(server, "cls-a", TEXTS)
    assert len(batch["data"]) == 3
    assert batch["data"][0]["probabilities"] == pytest.approx(probs, abs=1e-4)
    both = classify(server, ["cls-a", "cls-b"], TEXTS)
    for item in both["data"]:
        members = item["members"]
        assert set(members) == {"cls-a", "cls-b"}
        for label in both["labels"]:
            mean = (members["cls-a"]["probabilities"][label] +
                    members["cls-b"]["probabilities"][label]) / 2
            assert item["probabilities"][label] == pytest.approx(mean, abs=1e-9)


def test_classify_matches_the_trainers_evaluation(server):
    served = classify(server, "cls-a", TEXTS)["data"]
    reference = trainer_probabilities(server.staging.path("cls-a"), TEXTS)
    # the adapter is calibrated (temperature fitted on validation), and the server applies it;
    # a temperature below 1 magnifies the engines' score differences by 1/T
    temperature = server.staging.resolve("cls-a").manifest.temperature
    assert abs(temperature - 1.0) > 1e-3
    for got, want in zip(served, reference):
        assert got["probabilities"] == pytest.approx(want, abs=1e-3 / min(1.0, temperature))
    print(f"\nserved {served[0]['probabilities']}\ntrainer {reference[0]}")


def test_classify_applies_the_stored_label_bias_as_the_trainer_does(server):
    """An adapter whose manifest shifts `neutral` by +4 before its temperature: vLLM scores
    the same weights, and the gateway answers what the trainer's evaluation computes."""
    server.staging.copy("cls-a", "cls-biased", into=server.store, label_bias={"neutral": 4.0})
    assert wait_for(lambda: "cls-biased" in server.gw.reg.current, 10)
    biased = classify(server, "cls-biased", TEXTS)["data"]
    plain = classify(server, "cls-a", TEXTS)["data"]
    reference = trainer_probabilities(server.store.path("cls-biased"), TEXTS)
    temperature = server.store.resolve("cls-biased").manifest.temperature
    for got, unshifted, want in zip(biased, plain, reference, strict=True):
        assert got["probabilities"] == pytest.approx(want, abs=1e-3 / min(1.0, temperature))
        odds = [math.log(p["probabilities"]["neutral"] / p["probabilities"]["positive"])
                for p in (got, unshifted)]
        assert odds[0] - odds[1] == pytest.approx(4.0 / temperature, abs=0.05)
    server.store.remove("cls-biased")


def test_stored_ensemble_is_fitted_served_and_refused_when_a_member_changes(server, tmp_path):
    from lorastack.adapters import ensembles
    from lorastack.train.ensemble import build_ensemble

    result = build_ensemble("cls-ens", ["cls-a", "cls-c"], store=server.store.root,
                            runs_dir=tmp_path)
    assert sum(result["weights"].values()) == pytest.approx(1.0, abs=1e-9)
    assert set(result["members"]) == {"cls-a", "cls-c"} and result["metrics"]["validation"]
    assert (tmp_path / "cls-ens" / "reliability.png").stat().st_size > 1000
    assert wait_for(lambda: "cls-ens" in server.gw.reg.ensembles, 10)
    ens = ensembles.read(server.store.root, "cls-ens")
    cards = {c["id"]: c for c in server.client.get("/v1/models").json()["data"]}
    assert cards["cls-ens"]["task"] == "classification"
    assert cards["cls-ens"]["members"] == ens.weights == result["weights"]
    served = classify(server, "cls-ens", TEXTS)
    assert served["model"] == "cls-ens" and served["labels"] == list(ens.labels)
    apart = classify(server, ["cls-a", "cls-c"], TEXTS)  # the members as served, one by one
    for got, item in zip(served["data"], apart["data"], strict=True):
        assert set(got["members"]) == {"cls-a", "cls-c"}
        want = ensembles.mixture({n: m["probabilities"] for n, m in item["members"].items()},
                                 ens.weights, ens.temperature)
        assert got["probabilities"] == pytest.approx(want, abs=1e-6)
    # and what the trainer computes for the same mixture, members at their temperatures
    trainer = ensembles.mixture_rows({n: trainer_probabilities(server.store.path(n), TEXTS)
                                      for n in ("cls-a", "cls-c")}, ens.weights, ens.temperature)
    coldest = min([ens.temperature, *(server.store.resolve(n).manifest.temperature
                                      for n in ("cls-a", "cls-c"))])
    for got, want in zip(served["data"], trainer, strict=True):
        assert got["probabilities"] == pytest.approx(want, abs=2e-3 / min(1.0, coldest) ** 2)
    r = server.client.post("/v1/completions", json={"model": "cls-ens", "prompt": "Hi",
                                                    "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "ensemble_classifies_only", r.text
    r = server.client.post("/v1/classify", json={"model": ["cls-ens", "cls-a"], "input": "ok"})
    assert r.status_code == 400 and "request it alone" in r.text, r.text
    # a member replaced after the fit: refused, naming it, until the ensemble is fitted again
    before = server.gw.reg.current["cls-c"].identity
    server.store.copy("cls-b", "cls-c", replace=True)
    assert wait_for(lambda: server.gw.reg.current["cls-c"].identity != before, 10)
    r = server.client.post("/v1/classify", json={"model": "cls-ens", "input": "ok"})
    assert r.status_code == 503 and "'cls-c' changed after the ensemble was fitted" in r.text
    ensembles.remove(server.store.root, "cls-ens")
    assert wait_for(lambda: "cls-ens" not in server.gw.reg.ensembles, 10)
    ids = [c["id"] for c in server.client.get("/v1/models").json()["data"]]
    assert "cls-ens" not in ids and "cls-c" in ids


def test_multi_token_labels_match_the_trainer_and_the_engine_lives(server):
    pid = server.gw.engines[0].process.pid
    served = classify(server, "cls-multi", TEXTS)["data"]
    reference = trainer_probabilities(server.staging.path("cls-multi"), TEXTS)
    scale = 1 / min(1.0, server.staging.resolve("cls-multi").manifest.temperature)
    for got, want in zip(served, reference):
        assert got["probabilities"] == pytest.approx(want, abs=1e-3 * scale)
    one = classify(server, "cls-multi", TEXTS[1])["data"][0]  # alone = in a batch
    assert one["probabilities"] == pytest.approx(served[1]["probabilities"], abs=1e-4 * scale)
    # the request that used to kill vLLM 0.32's engine: prompt_logprobs on a LoRA adapter
    r = server.client.post("/v1/completions", json={"model": "cls-multi", "prompt": TEXTS[0],
                                                    "max_tokens": 2, "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["prompt_logprobs"]) > 5
    assert server.gw.engines[0].process.pid == pid and server.gw.engines[0].up
    print(f"\nmulti-token labels, served {served[0]['probabilities']}\ntrainer {reference[0]}")


def test_hot_load_while_requests_run(server):
    with Load(server, ["cls-a", "gen"]) as load:
        time.sleep(1)
        server.staging.copy("cls-b", "hot", into=server.store)
        written = time.monotonic()
        listed = lambda: "hot" in {m["id"] for m in server.client.get("/v1/models").json()["data"]}
        assert wait_for(listed, timeout=30)
        print(f"\n'hot' servable {time.monotonic() - written:.2f} s after the write")
        assert classify(server, "hot", TEXTS[0])["data"][0]["label"]
        time.sleep(1)
    assert load.codes and not load.failures


def test_replace_serves_the_new_weights(server):
    expected = classify(server, "cls-b", TEXTS)["data"]
    before = classify(server, "cls-a", TEXTS)["data"]
    assert before[0]["probabilities"] != pytest.approx(expected[0]["probabilities"], abs=1e-4)
    identity = lambda: {a["name"]: a["identity"] for a in
                        server.client.get("/v1/adapters").json()["data"]}["cls-a"]
    old = identity()
    with Load(server, ["cls-a", "cls-a"]) as load:
        time.sleep(1)
        server.staging.copy("cls-b", "cls-a", into=server.store, replace=True)
        assert wait_for(lambda: identity() != old, timeout=30)
        time.sleep(1)
    assert load.codes and not load.failures
    after = classify(server, "cls-a", TEXTS)["data"]
    for got, want in zip(after, expected):
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)


def test_unload_and_load_by_hand(server):
    user = server.client.post("/v1/adapters/unload", json={"name": "hot"})
    assert user.status_code == 403
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert server.client.post("/v1/adapters/unload", json={"name": "hot"},
                              headers=admin).status_code == 200
    gone = server.client.post("/v1/classify", json={"model": "hot", "input": "x"})
    assert gone.status_code == 404
    assert server.client.post("/v1/adapters/load", json={"name": "hot"},
                              headers=admin).status_code == 200
    assert classify(server, "hot", "fine")["data"][0]["label"]


def test_lru_eviction_and_reload_on_demand(server):
    names = ["cls-a", "cls-b", "hot", "gen"]  # four adapters, capacity 2
    for _ in range(2):
        for name in names:
            if name == "gen":
                r = server.client.post("/v1/completions", json={"model": "gen", "prompt": "Hi",
                                                                 "max_tokens": 3})
                assert r.status_code == 200, r.text
            else:
                classify(server, name, TEXTS[0])
    engines = server.client.get("/health").json()["vllm"]
    assert all(e["adapters_loaded"] <= 2 for e in engines)
    metrics = server.client.get("/metrics").text
    evictions = [line for line in metrics.splitlines()
                 if line.startswith('lorastack_adapter_events_total{event="evictions"}')]
    assert evictions and float(evictions[0].split()[-1]) >= 4


def test_auth_limits_and_errors(server):
    anon = httpx.post(server.url + "/v1/classify", json={"model": "cls-a", "input": "x"})
    assert anon.status_code == 401 and anon.json()["error"]["code"] == "missing_api_key"
    c = server.client
    cases = [
        (c.post("/v1/completions", json={"model": "gen", "prompt": "word " * 800}), 400,
         "prompt_too_long"),
        (c.post("/v1/completions", json={"model": "gen", "prompt": "x", "max_tokens": 65}),
         400, "max_tokens_too_large"),
        (c.post("/v1/classify", json={"model": "cls-a", "input": ["x"] * 9}), 400,
         "batch_too_large"),
        (c.post("/v1/classify", content=b'{"model": "cls-a", "input": "' + b"x" * 1_100_000
                + b'"}'), 413, "body_too_large"),
        (c.post("/v1/chat/completions", content=b"{oops"), 400, "invalid_json"),
        (c.post("/v1/classify", json={"model": "cls-a", "input": 3}), 422, "invalid_request"),
        (c.post("/v1/chat/completions", json={"model": "nope", "messages": [
            {"role": "user", "content": "x"}]}), 404, "model_not_found"),
        (c.post("/v1/classify", json={"model": "gen", "input": "x"}), 400, "not_a_classifier"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code
    assert "cls-a" in cases[6][0].json()["error"]["message"]  # lists what is available


def test_upstream_mode_on_a_running_vllm(server, tmp_path):
    """A second gateway that starts no vLLM but uses the first one's, with --upstream."""
    import uvicorn

    from lorastack.serve.app import create_app
    from lorastack.serve.settings import ServeSettings
    from lorastack.serve.vllm_proc import listening_socket

    sock = listening_socket()
    port = sock.getsockname()[1]
    app = create_app(ServeSettings(store=server.store.root, port=port, capacity=2,
                                   upstream=[server.gw.engines[0].url],
                                   work_dir=tmp_path / "work"))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, args=([sock],), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: uv.started or not thread.is_alive(), timeout=120)
        assert uv.started and app.state.gateway.engines[0].process is None
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as other:
            mine = classify(server, "cls-b", TEXTS)["data"]
            theirs = other.post("/v1/classify", json={"model": "cls-b", "input": TEXTS})
            assert theirs.status_code == 200, theirs.text
            for a, b in zip(mine, theirs.json()["data"]):
                assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-6)
            gen = other.post("/v1/completions", json={"model": "gen", "prompt": "Hi",
                                                      "max_tokens": 3})
            assert gen.status_code == 200 and gen.json()["model"] == "gen"
    finally:
        uv.should_exit = True
        thread.join(60)


def test_two_gateways_over_one_vllm_agree_on_what_is_loaded(server, tmp_path):
    """Two gateways behind one load balancer: one upstream vLLM, one store, one work dir, and
    capacity 1 each for two adapters, so each would evict what the other uses if it did not see
    the other's leases. Through replacements and unloads on one gateway, no request on either
    fails, and an old version's snapshot goes only when both have let it go."""
    from lorastack.adapters.store import version_id

    store = AdapterStore(tmp_path / "store")
    for src, name in (("cls-a", "cls-ha"), ("cls-b", "cls-hb")):
        server.staging.copy(src, name, into=store)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    settings = {"upstream": [server.gw.engines[0].url], "capacity": 1, "max_loras": 2,
                "api_keys": [KEY], "admin_key": ADMIN, "poll_interval_s": 0.25}
    with serve_in_thread(store, tmp_path, **settings) as (one, g1), \
            serve_in_thread(store, tmp_path, **settings) as (two, g2):
        assert g1.work_dir == g2.work_dir and g1.reg.leases.gateway != g2.reg.leases.gateway
        urls = [SimpleNamespace(url=str(c.base_url)) for c in (one, two)]
        versions = lambda gw: gw.reg.current["cls-ha"].identity
        loads = []
        with Load(urls[0], ["cls-ha", "cls-hb"]) as load1, \
                Load(urls[1], ["cls-ha", "cls-hb"]) as load2:
            loads += [load1, load2]
            for src in ("cls-c", "cls-b", "cls-a"):  # the last one is the first version again
                time.sleep(1)
                want = version_id(server.staging.copy(src, "cls-ha", into=store, replace=True))
                assert wait_for(lambda w=want: versions(g1) == versions(g2) == w, timeout=30)
            # enough requests to have crossed the swaps, however fast this machine answers
            assert wait_for(lambda: min(len(load1.codes), len(load2.codes)) > 10, timeout=120)
        # one gateway's admin unloads and loads cls-hb; the other one's requests for it run on
        with Load(urls[0], ["cls-ha"]) as load1, \
                Load(urls[1], ["cls-ha", "cls-hb"]) as load2:
            loads += [load1, load2]
            for _ in range(3):
                r = one.post("/v1/classify", json={"model": "cls-hb", "input": TEXTS[0]},
                             headers=admin)  # loaded on this gateway's side too
                assert r.status_code == 200, r.text
                time.sleep(0.5)
                r = one.post("/v1/adapters/unload", json={"name": "cls-hb"}, headers=admin)
                assert r.status_code == 200, r.text
                time.sleep(1)
                r = one.post("/v1/adapters/load", json={"name": "cls-hb"}, headers=admin)
                assert r.status_code == 200, r.text
            assert wait_for(lambda: min(len(load1.codes), len(load2.codes)) > 10, timeout=120)
        for load in loads:
            assert len(load.codes) > 10 and not load.failures, load.failures[:3]
        # capacity 1, two adapters: each gateway counts the other's on the engine, and evicts
        # none of them, as the other holds them (without leases: an unload at every switch)
        assert all(gw.reg.loaded_count(gw.engines[0]) == 2 for gw in (g1, g2))
        evictions = sum(gw.metrics.adapter_events.labels("evictions")._value.get()
                        for gw in (g1, g2))
        current = {versions(g1), g1.reg.current["cls-hb"].identity}
        assert wait_for(lambda: {p.name for p in (g1.work_dir / "snapshots").iterdir()}
                        == current, timeout=10)  # the three old versions of cls-ha are gone
    print(f"\n{sum(len(load.codes) for load in loads)} requests over two gateways, "
          f"{evictions:.0f} evictions, none failed")
    # both stopped: nothing of theirs is left on the shared vLLM
    models = httpx.get(server.gw.engines[0].url + "/v1/models").json()["data"]
    assert {m["id"] for m in models if m["id"].startswith("cls-h")} == set()


def test_vllm_killed_and_recovered(server):
    engine = server.gw.engines[0]
    pid = engine.process.pid
    os.killpg(pid, signal.SIGKILL)
    saw_503 = wait_for(lambda: server.client.post("/v1/classify", json={
        "model": "cls-a", "input": "x"}).status_code == 503, timeout=30, step=0.2)
    assert saw_503
    down = server.client.post("/v1/completions", json={"model": "gen", "prompt": "x"})
    assert down.status_code == 503 and "vLLM" in down.json()["error"]["message"]
    started = time.monotonic()
    assert wait_for(lambda: server.client.get("/health").status_code == 200, timeout=900,
                    step=1)
    print(f"\nvLLM back after {time.monotonic() - started:.0f} s")
    assert engine.process.pid != pid
    assert classify(server, "cls-a", TEXTS)["data"]
    r = server.client.post("/v1/completions", json={"model": "gen", "prompt": "Hi",
                                                    "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert "lorastack_vllm_restarts_total 1.0" in server.client.get("/metrics").text
