"""The gateway's documented contract: /openapi.json describes every route's body and answer
with the models the routes validate with; odd bodies get 4xx answers that name the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest
from serve_helpers import write_fake_adapter
from typer.testing import CliRunner

POSTS = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatRequest",
         "/v1/classify": "ClassifyRequest", "/v1/adapters/load": "AdapterAction",
         "/v1/adapters/unload": "AdapterAction"}


def test_openapi_describes_every_body_and_answer(make):
    with make() as (client, _, _):
        doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, model in POSTS.items():
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{model}"}, path
        assert schemas[model]["properties"], model
    assert set(schemas["ClassifyRequest"]["required"]) == {"model", "input"}
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert schemas["ChatRequest"]["properties"]["messages"]["minItems"] == 1
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            ok = op["responses"]["200"]["content"]
            assert any("schema" in v and v["schema"] for v in ok.values()), (method, path)
            error = op["responses"]["4XX"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    answers = {p: doc["paths"][p][m]["responses"]["200"]["content"]["application/json"]
               ["schema"].get("$ref", "").rsplit("/", 1)[-1]
               for p, m in (("/v1/models", "get"), ("/v1/classify", "post"),
                            ("/v1/adapters", "get"), ("/health", "get"))}
    assert answers == {"/v1/models": "ModelList", "/v1/classify": "ClassifyResponse",
                       "/v1/adapters": "AdapterList", "/health": "Health"}


def test_models_answer_keeps_openai_fields(make, store):
    write_fake_adapter(store, "a")
    with make() as (client, _, _):
        answer = client.get("/v1/models").json()
    assert answer["object"] == "list"
    base, adapter = answer["data"]
    assert base == {"id": "smollm2-135m", "object": "model", "created": base["created"],
                    "owned_by": "lorastack", "root": "smollm2-135m", "parent": None,
                    "task": "generation", "max_model_len": 128}
    assert adapter["parent"] == "smollm2-135m" and adapter["labels"] == ["yes", "no"]
    assert adapter["lora"] == {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    assert set(adapter) == {"id", "object", "created", "owned_by", "root", "parent", "task",
                            "labels", "examples", "lora", "metrics"}


def test_deeply_nested_json_is_a_400_not_a_500(make, store):
    write_fake_adapter(store, "a")
    with make(max_body_bytes=100_000) as (client, _, _):
        for route in ("/v1/classify", "/v1/completions", "/v1/chat/completions",
                      "/v1/adapters/load"):
            r = client.post(route, content=b"[" * 10_000 + b"]" * 10_000,
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (route, r.text)
            assert r.json()["error"]["code"] == "invalid_json"
            assert "nested too deeply" in r.json()["error"]["message"]
            inner = b'{"model": "a", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"
            r = client.post(route, content=inner, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (route, r.text)


def test_a_lone_surrogate_is_a_400_and_a_surrogate_pair_is_text(make, store):
    """JSON may escape half a UTF-16 pair ("\\ud800"), which no tokenizer reads: a 400 that
    names it, on every route, where a whole pair (an emoji) is ordinary text."""
    write_fake_adapter(store, "a")
    with make() as (client, _, _):
        for route, field in (("/v1/classify", '"input": "'), ("/v1/completions", '"prompt": "'),
                             ("/v1/chat/completions",
                              '"messages": [{"role": "user", "content": "')):
            close = '"}]}' if "messages" in field else '"}'
            body = '{"model": "a", ' + field + "bad \\ud800 text" + close
            r = client.post(route, content=body.encode(),
                            headers={"content-type": "application/json"})
            assert r.status_code == 400, (route, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_json" and "lone UTF-16 surrogate" in err["message"]
            assert "\\ud800" in err["message"], err
        r = client.post("/v1/classify", content=b'{"model": "a", "input": "ok \\ud83d\\ude00"}',
                        headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


def test_a_record_missing_a_prompt_field_is_a_422_naming_it(make, store):
    write_fake_adapter(store, "drugs", prompt_template="Drug: {drug}\nReview: {text}")
    with make() as (client, _, _):
        r = client.post("/v1/classify", json={"model": "drugs", "input": [
            {"text": "fine", "drug": "x"}, {"text": "no drug here"}]})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "missing_field" and err["param"] == "input"
        assert "input 1 lacks the field(s) drug" in err["message"]
        assert "drug, text" in err["message"]
        r = client.post("/v1/classify", json={"model": "drugs", "input": "a plain string"})
        assert r.status_code == 422 and "input 0 lacks the field(s) drug" in r.text
        r = client.post("/v1/classify", json={"model": "drugs",
                                              "input": [{"text": "ok", "drug": "x"}]})
        assert r.status_code == 200, r.text


def test_validation_errors_name_the_field_and_what_it_is(make, store):
    write_fake_adapter(store, "a")
    with make() as (client, _, _):
        r = client.post("/v1/completions", json={"prompt": "x"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "missing_model" and err["param"] == "model"
        assert "model: required: the base model or an adapter name" in err["message"]
        for body, param in (({"model": "a", "prompt": "x", "n": 0}, "n"),
                            ({"model": "a", "prompt": "x", "n": True}, "n"),
                            ({"model": "a", "prompt": []}, "prompt"),
                            ({"model": "a", "prompt": "x", "max_tokens": "5"}, "max_tokens")):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.text)
        r = client.post("/v1/chat/completions", json={"model": "a", "messages": [{"x": 1}]})
        assert r.status_code == 400 and "messages.0.role" in r.text
        r = client.post("/v1/classify", json={"model": "a", "input": [1] * 50})
        assert r.status_code == 422
        assert r.json()["error"]["message"] == (
            "invalid request: input: not one of the forms it takes (one text, or a batch; an "
            "item may be a record of the fields the adapter's prompt template uses ({\"text\": "
            "..., \"drug\": ...}))")
        r = client.post("/v1/classify", json={"model": 3, "input": "x", "top_k": 0,
                                              "a": 1, "b": 2, "c": 3, "d": 4})
        assert r.status_code == 422 and r.json()["error"]["message"].endswith("; and 1 more")
        # fields the gateway does not check are forwarded to vLLM unchanged
        r = client.post("/v1/completions", json={"model": "a", "prompt": "x",
                                                 "temperature": 0, "seed": 3})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("given, port", [(["--port", "0"], 0), (["--port", "9123"], 9123),
                                         ([], 8000)])
def test_serve_cli_passes_every_port_on(monkeypatch, given, port):
    import lorastack.serve.cli as serve_cli
    from lorastack.commands import app

    seen = {}
    monkeypatch.setattr(serve_cli, "run", lambda settings, level: seen.update(s=settings))
    result = CliRunner().invoke(app, ["serve", *given, "--capacity", "6"])
    assert result.exit_code == 0, result.output
    assert seen["s"].port == port and seen["s"].capacity == 6


def test_serve_holds_its_port_before_vllm_starts_and_says_when_it_is_taken():
    """The port is bound before the lifespan starts vLLM (whose random internal ports could
    otherwise take it during the minute vLLM needs), and a taken port is a one-line error."""
    import socket

    from lorastack.serve.cli import _bind

    sock = _bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    try:
        other = socket.socket()
        with pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        other.close()
        proc = subprocess.run([sys.executable, "-m", "lorastack", "serve", "--port", str(port),
                               "--upstream", "http://127.0.0.1:9"], capture_output=True,
                              text=True, timeout=120, check=False)
    finally:
        sock.close()
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_setting_is_a_flag_and_reaches_the_settings(monkeypatch):
    """serve's flags are ServeSettings' fields (one declaration): each one reaches it."""
    import lorastack.serve.cli as serve_cli
    from lorastack.commands import app
    from lorastack.serve.settings import ServeSettings

    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "300"}).output
    for name in ServeSettings.model_fields:
        assert serve_cli._flag(name) in help_text, name
        assert f"LORASTACK_{name.upper()}" in help_text, name
    seen = {}
    monkeypatch.setattr(serve_cli, "run", lambda settings, level: seen.update(s=settings,
                                                                               level=level))
    result = CliRunner().invoke(app, [
        "serve", "--no-restart-vllm", "--kv-cache-gb", "1.5", "--vllm-threads", "vllm",
        "--upstream", "http://a:1", "--upstream", "http://b:2", "--api-key", "k1",
        "--api-key", "k2", "--start-timeout", "9", "--vllm-args=--enforce-eager",
        "--log-level", "warning"])
    assert result.exit_code == 0, result.output
    s = seen["s"]
    assert (s.restart_vllm, s.kv_cache_gb, s.vllm_threads) == (False, 1.5, "vllm")
    assert s.upstream == ["http://a:1", "http://b:2"] and s.api_keys == ["k1", "k2"]
    assert (s.start_timeout_s, s.vllm_args, seen["level"]) == (9, ["--enforce-eager"],
                                                               "warning")
    bad = CliRunner().invoke(app, ["serve", "--vllm-threads", "some"])
    assert bad.exit_code == 2 and "vllm_threads" in bad.output
