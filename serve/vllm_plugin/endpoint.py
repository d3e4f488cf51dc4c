"""lorastack's `vllm.endpoint_plugins` entry: what it adds to vLLM's own API server.

vLLM loads endpoint plugins only when VLLM_PLUGINS names them (VLLM_PLUGINS=lorastack, which
also keeps the general plugin of the same name). With the store resolver on (resolver.py):
- POST /v1/classify on every vLLM replica, the gateway's request and answer (serve/protocol.py)
  and its scoring path (serve/scoring.py: the same prompt and label-continuation ids, the same
  logprob queries, the manifest's temperature), for the store's classification adapters, so
  that replicas behind Ray or Kubernetes answer it without the gateway. Each adapter is asked
  for by its version (name@hash), so the manifest scored with is the one vLLM loaded. Not here:
  stored ensembles, auth beyond vLLM's own --api-key, the gateway's limits and metrics.
- when the resolver refused an adapter, vLLM's 404 for that model ("The model `x` does not
  exist") carries lorastack's reason, so a client learns what to fix without reading the log.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from fastapi import Request  # a module global: FastAPI resolves the route's annotations here
from fastapi.responses import JSONResponse

_NOT_FOUND = re.compile(r"The model `(?P<name>.+?)` does not exist")


class LorastackEndpoints:
    """The EndpointPlugin vLLM instantiates (vllm/plugins/endpoint_plugins/interface.py)."""

    name = "lorastack"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        app.add_middleware(RefusalReasons)

        @app.post("/v1/classify")
        async def classify(request: Request) -> JSONResponse:
            from lorastack.serve.protocol import ApiError

            try:
                answer = await _classify(request)
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
            return JSONResponse(answer.model_dump(exclude_none=True))

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        from lorastack.serve.scoring import Tokenizer

        state.lorastack = Replica(f"http://127.0.0.1:{args.port}", Path(str(args.model)),
                                  Tokenizer(Path(str(args.model))))


class Replica:
    """What the replica's /v1/classify keeps: where its own vLLM answers, the base model's
    tokenizer, and each adapter version's label continuations (tokenized once)."""

    def __init__(self, url: str, base: Path, tok: Any) -> None:
        from lorastack.serve.settings import ServeSettings

        self.url, self.base, self.tok = url, base, tok
        limits = ServeSettings.model_fields  # the gateway's defaults: one declaration
        self.max_batch = limits["max_batch"].default
        self.max_body_bytes = limits["max_body_bytes"].default
        self.max_prompt_tokens = limits["max_prompt_tokens"].default
        self.versions: dict[str, Any] = {}  # name@hash -> registry.Served


async def _classify(request: Any):
    import httpx
    from pydantic import ValidationError

    from lorastack.adapters.store import version_id
    from lorastack.serve.engine import EngineError
    from lorastack.serve.protocol import ApiError, ClassifyRequest
    from lorastack.serve.registry import Served
    from lorastack.serve.routes.common import as_api_error, validation_message
    from lorastack.serve.scoring import (
        PromptTooLong,
        build_rows,
        check_batch,
        check_classifiers,
        classify_response,
        score,
    )
    from lorastack.serve.vllm_plugin import resolver

    active, replica = resolver.ACTIVE, getattr(request.app.state, "lorastack", None)
    if active is None or replica is None:
        raise ApiError(503, "/v1/classify on vLLM needs lorastack's store resolver: start vLLM "
                       f"with {resolver.STORE_ENV} set (README: the store resolver)",
                       "resolver_off")
    raw = await request.body()
    if len(raw) > replica.max_body_bytes:
        raise ApiError(413, f"the body is {len(raw)} bytes, over {replica.max_body_bytes}",
                       "body_too_large")
    try:
        req = ClassifyRequest.model_validate(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        message = validation_message(exc, ClassifyRequest) if isinstance(exc, ValidationError) \
            else f"the body is not a JSON object ({exc})"
        raise ApiError(422 if isinstance(exc, ValidationError) else 400, message,
                       "invalid_request") from None
    check_batch(req.records, replica.max_batch)
    members = []
    for name in req.models:
        try:  # pinned and checked by the resolver; scored by the version vLLM loads
            adapter = await asyncio.to_thread(active.fetch, str(replica.base), name)
        except resolver.Refused as exc:
            raise ApiError(404, f"the store resolver refused {name!r}: {exc}", "model_not_found",
                           "model") from None
        identity = version_id(adapter)
        members.append(replica.versions.setdefault(
            identity, Served(name, adapter, identity, adapter.path)))
    labels = check_classifiers(members, req.records)
    headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}

    async with httpx.AsyncClient(base_url=replica.url, timeout=600, headers=headers) as client:
        async def send(body: dict):
            return await client.post("/v1/completions", json=body)

        async def one(served):
            rows = await asyncio.to_thread(build_rows, replica.tok, served, req.records,
                                           replica.max_prompt_tokens)
            sums = await score(send, served.identity, rows)
            return rows.prompt_tokens(), [served.manifest.probabilities(row) for row in sums]

        try:
            answers = list(await asyncio.gather(*(one(m) for m in members)))
        except (PromptTooLong, EngineError) as exc:
            raise as_api_error(exc) from None
        except httpx.HTTPError as exc:
            raise ApiError(502, f"this replica's vLLM did not answer its own scoring requests "
                           f"({type(exc).__name__}: {exc})", "engine_error") from None
    return classify_response(",".join(req.models), labels, req.models, answers,
                             len(req.records), req.top_k)


class RefusalReasons:
    """ASGI middleware: a 404 naming a model the resolver refused gets the resolver's reason
    appended to its message. Every other response passes through untouched, unbuffered."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        from lorastack.serve.vllm_plugin import resolver

        active = resolver.ACTIVE
        if scope["type"] != "http" or active is None:
            await self.app(scope, receive, send)
            return
        held: dict | None = None
        chunks: list[bytes] = []

        async def relay(message: dict) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] == 404:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = with_reason(b"".join(chunks), active.refusals)
            headers = [(k, v) for k, v in held.get("headers", []) if k.lower() != b"content-length"]
            await send({**held, "headers": [*headers, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, relay)


def with_reason(body: bytes, refusals: dict[str, str]) -> bytes:
    """vLLM's error body with lorastack's reason for a refused model appended (else as is)."""
    try:
        data = json.loads(body)
        error = data["error"]
        found = _NOT_FOUND.search(error["message"])
    except (ValueError, KeyError, TypeError):
        return body
    reason = found and refusals.get(found["name"])
    if not reason:
        return body
    error["message"] = f"{error['message']} lorastack's resolver refused it: {reason}"
    return json.dumps(data).encode()
