"""A stand-in for vLLM's OpenAI server, for fast unit tests of the gateway only (the integration
tests run the real engine). It answers like vLLM 0.32 does on the routes the gateway uses and
records the LoRA loads and unloads it sees."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


class FakeVllm:
    def __init__(self, base: str = "smollm2-135m") -> None:
        self.base = base
        self.loaded: dict[str, str] = {}  # lora name -> path
        self.events: list[tuple[str, str]] = []  # ("load" | "unload", name)
        self.seen_models: list[str] = []
        self.gate = asyncio.Event()  # prompts starting with WAIT block until it is set
        self.gate.set()
        self.healthy = True
        self.dead = False  # a prompt starting with KILL kills the "engine" until revive()
        self.app = self._build()

    def revive(self) -> None:
        """What a restart does: healthy again, every adapter forgotten."""
        self.dead, self.healthy = False, True
        self.loaded.clear()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return PlainTextResponse("", 200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models():
            cards = [{"id": self.base, "object": "model", "parent": None}]
            cards += [{"id": n, "object": "model", "parent": self.base} for n in self.loaded]
            return {"object": "list", "data": cards}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request):
            body = await request.json()
            if body["lora_name"] in self.loaded:
                return JSONResponse({"error": {"message": f"The lora adapter "
                                     f"'{body['lora_name']}' has already been loaded."}}, 400)
            self.loaded[body["lora_name"]] = body["lora_path"]
            self.events.append(("load", body["lora_name"]))
            return PlainTextResponse("Success")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request):
            name = (await request.json())["lora_name"]
            if name not in self.loaded:
                return JSONResponse({"error": {"message": "cannot be found"}}, 404)
            del self.loaded[name]
            self.events.append(("unload", name))
            return PlainTextResponse("Success")

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def complete(request: Request):
            body = await request.json()
            model = body["model"]
            self.seen_models.append(model)
            if model != self.base and model not in self.loaded:
                return JSONResponse({"error": {"message": f"The model `{model}` does not "
                                     f"exist.", "type": "NotFoundError", "code": 404}}, 404)
            prompt = body.get("prompt") or json.dumps(body.get("messages"))
            if isinstance(prompt, str) and prompt.startswith("KILL"):
                self.dead, self.healthy = True, False
                self.gate.set()  # the requests in flight fail with it, as in vLLM
            if isinstance(prompt, str) and prompt.startswith("WAIT"):
                await self.gate.wait()
            if self.dead:  # vLLM's answer to every request once EngineCore died
                return JSONResponse({"error": {"message": "EngineCore encountered an issue. "
                                     "See stack trace (above) for the root cause.",
                                     "type": "InternalServerError", "code": 500}}, 500)
            if body.get("logprob_token_ids"):
                return self._scores(body)
            chunk = {"id": "x", "object": "text_completion", "model": model,
                     "choices": [{"index": 0, "text": f"hello from {model}"}]}
            if body.get("stream"):
                async def events():
                    for word in ("hello", " from", f" {model}"):
                        chunk["choices"][0]["text"] = word
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                return StreamingResponse(events(), media_type="text/event-stream")
            chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            return chunk

        return app

    def _scores(self, body: dict):
        # deterministic: token id t gets log-probability -(t % 7) - 1
        tops = {f"token_id:{t}": -float(t % 7) - 1 for t in body["logprob_token_ids"]}
        choices = [{"index": i, "text": "x", "logprobs": {"top_logprobs": [tops]}}
                   for i in range(len(body["prompt"]))]
        return {"id": "x", "object": "text_completion", "model": body["model"],
                "choices": choices}
