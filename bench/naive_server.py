"""The server a user writes first: transformers + peft behind FastAPI, one request at a time.

    .venv/bin/python -m bench.naive_server --store DIR [--base smollm2-135m] [--port 8100]

The baseline of the serving benchmarks. Every adapter of the store is loaded into one PeftModel
(`load_adapter`); a lock lets one request at a time switch to its adapter (`set_adapter`, or
`disable_adapter()` for the base model) and run `model.generate` (greedy, float32). Nothing
is batched, and nothing is cached between requests.

Routes, shaped as the gateway's so that one load generator drives both:
- POST /v1/completions  {"model", "prompt": str, "max_tokens", "min_tokens" | "ignore_eos"}:
  OpenAI's text_completion answer with `usage`;
- POST /v1/classify  {"model", "input": text | record | [...]}: label probabilities scored the
  straightforward way: one forward pass per label over prompt + label continuation, the sum of
  the continuation's log-probabilities, softmax over the labels. The token ids come from the
  functions the trainer and the gateway take them from (lorastack.adapters.labels.prompt_ids
  and label_continuations), so both servers see the same tokens;
- GET /health.
Weights are read from safetensors only (the base with use_safetensors=True; a store adapter
with anything but adapter_model.safetensors is refused).
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from pathlib import Path


def build_app(store_root: Path, base: str = "smollm2-135m"):
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorastack.adapters import labels as scoring
    from lorastack.adapters.models import resolve_base
    from lorastack.adapters.store import AdapterStore

    base_model = resolve_base(base)
    tok = AutoTokenizer.from_pretrained(str(base_model.path))
    model = AutoModelForCausalLM.from_pretrained(str(base_model.path), dtype=torch.float32,
                                                 use_safetensors=True)
    adapters = AdapterStore(store_root).list()
    if not adapters:
        raise SystemExit(f"naive server: no adapters in {store_root}")
    manifests = {}
    for adapter in adapters:
        unsafe = [p.name for p in adapter.path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        if unsafe:
            raise SystemExit(f"naive server: {adapter.path} holds pickle weights {unsafe}; "
                             f"safetensors only")
        if not manifests:
            model = PeftModel.from_pretrained(model, str(adapter.path), adapter_name=adapter.name)
        else:
            model.load_adapter(str(adapter.path), adapter_name=adapter.name)
        manifests[adapter.name] = adapter.manifest
    model.eval()
    lock = threading.Lock()
    app = FastAPI(title="naive transformers + peft server")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error",
                                       "code": None, "param": None}}, status_code=status)

    def check_model(name) -> JSONResponse | None:
        if name != base_model.name and name not in manifests:
            return error(404, f"model {name!r} is not served here")
        return None

    def adapter_on(name: str):
        """Switch the model to adapter `name` (the base: a context that disables adapters)."""
        if name == base_model.name:
            return model.disable_adapter()
        model.set_adapter(name)
        return _Nothing()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: dict):
        name = body.get("model")
        if (bad := check_model(name)) is not None:
            return bad
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return error(400, "prompt must be a string")
        max_tokens = int(body.get("max_tokens") or 16)
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens") or 0)
        ids = tok(prompt, return_tensors="pt")
        with lock, torch.inference_mode(), adapter_on(name):
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=min_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        n_prompt, n_new = int(ids["input_ids"].shape[1]), int(new.shape[0])
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True),
                             "finish_reason": "length" if n_new >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                          "total_tokens": n_prompt + n_new}}

    @app.post("/v1/classify")
    def classify(body: dict):
        name = body.get("model")
        if name not in manifests or manifests[name].task != "classification":
            return error(404, f"{name!r} is not a classification adapter served here")
        m = manifests[name]
        items = body.get("input")
        items = items if isinstance(items, list) else [items]
        records = [{"text": item} if isinstance(item, str) else item for item in items]
        conts = scoring.label_continuations(tok, m)  # re-tokenized per request: naive
        data, prompt_tokens = [], 0
        with lock, torch.inference_mode(), adapter_on(name):
            for i, record in enumerate(records):
                prompt = scoring.prompt_ids(tok, m.chat_format, m.prompt_template, record)
                sums = {}
                for label, cont in conts.items():  # one forward pass per label
                    ids = torch.tensor([prompt + cont])
                    logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                    positions = torch.arange(len(prompt) - 1, len(prompt) + len(cont) - 1)
                    sums[label] = float(logprobs[positions, torch.tensor(cont)].sum())
                    prompt_tokens += len(prompt) + len(cont)
                probs = m.probabilities(sums)
                data.append({"index": i, "label": scoring.predict(probs),
                             "probabilities": probs})
        return {"object": "classification", "model": name, "labels": list(m.labels),
                "data": data, "usage": {"prompt_tokens": prompt_tokens,
                                        "total_tokens": prompt_tokens}}

    return app


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description="naive transformers + peft server (baseline)")
    parser.add_argument("--store", required=True, help="adapter store: every adapter is loaded")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    import uvicorn

    from lorastack.serve.vllm_proc import listening_socket

    sock = listening_socket(args.host, args.port)  # held while the model loads (a vLLM
    app = build_app(Path(args.store), args.base)   # starting beside it picks random ports)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
