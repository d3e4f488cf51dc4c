"""OpenAI routes: /v1/models (ours), /v1/completions and /v1/chat/completions (forwarded).

A request for an adapter is sent to vLLM under the adapter's current identity (name@hash) while
the registry holds that version; the identity is rewritten back to the public name in the
answer, streamed line by line so that tokens reach the client as vLLM emits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from lorastack.serve.crashes import DEAD_ANSWER, shape_of
from lorastack.serve.engine import EngineError
from lorastack.serve.gateway import Gateway
from lorastack.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    CompletionResponse,
    LoraInfo,
    ModelCard,
    ModelList,
    error_body,
)
from lorastack.serve.routes.common import GatewayDep, documented, json_body, require_api_key

router = APIRouter(dependencies=[Depends(require_api_key)])
CompletionBody = Annotated[CompletionRequest, json_body(CompletionRequest, status=400)]
ChatBody = Annotated[ChatRequest, json_body(ChatRequest, status=400)]
# OpenAI's and vLLM's status for a request that does not validate is 400
_ANSWERS: dict[int | str, dict[str, Any]] = {200: {"model": CompletionResponse, "content": {"text/event-stream": {
    "schema": {"type": "string", "description": "with stream: true, `data: {chunk}` lines, "
               "then `data: [DONE]`"}}}}}


@router.get("/v1/models", response_model_exclude_unset=True)
async def list_models(gw: GatewayDep) -> ModelList:
    reg = gw.reg
    # fields are given explicitly: the answer leaves out only what a card does not have
    # (labels for the base...), and keeps `parent: null` and the OpenAI fields
    card = functools.partial(ModelCard, object="model", owned_by="lorastack")
    cards = [card(id=reg.base_name, created=gw.started_at, root=reg.base_name, parent=None,
                  task="generation", max_model_len=gw.settings.max_model_len)]
    if (merged := reg.merged) is not None:  # a merged classifier: it generates and classifies
        cards[0] = card(id=reg.base_name, created=gw.started_at, root=reg.base_name,
                        parent=None, task="classification", labels=list(merged.manifest.labels),
                        examples=list(merged.manifest.examples),
                        max_model_len=gw.settings.max_model_len,
                        metrics={"validation": merged.manifest.metrics.validation,
                                 "test": merged.manifest.metrics.test})
    for name in reg.names():
        m = reg.current[name].manifest
        cards.append(card(
            id=name, created=_epoch(m.created_at), root=name, parent=reg.base_name,
            task=m.task, labels=list(m.labels), examples=list(m.examples),
            lora=LoraInfo(rank=m.lora.rank, alpha=m.lora.alpha,
                          target_modules=list(m.lora.target_modules)),
            metrics={"validation": m.metrics.validation, "test": m.metrics.test}))
    for name, ens in sorted(reg.ensembles.items()):
        if name in reg.current:
            continue  # an adapter of that name wins (the registry reports the clash)
        cards.append(card(
            id=name, created=_epoch(ens.created_at), root=name, parent=reg.base_name,
            task="classification", labels=list(ens.labels),
            examples=_ensemble_examples(reg, ens), members=ens.weights,
            metrics={"validation": ens.metrics.validation, "test": ens.metrics.test}))
    return ModelList(object="list", data=cards)


def _ensemble_examples(reg, ensemble) -> list:
    """Inputs to try: its first served member's."""
    for member in ensemble.members:
        if member.adapter in reg.current:
            return list(reg.current[member.adapter].manifest.examples)
    return []


@router.post("/v1/completions", response_class=Response, responses=_ANSWERS,
             openapi_extra=documented(CompletionRequest))
async def completions(request: Request, gw: GatewayDep, req: CompletionBody) -> Response:
    return await _forward(request, gw, "/v1/completions", req)


@router.post("/v1/chat/completions", response_class=Response, responses=_ANSWERS,
             openapi_extra=documented(ChatRequest))
async def chat_completions(request: Request, gw: GatewayDep, req: ChatBody) -> Response:
    return await _forward(request, gw, "/v1/chat/completions", req)


async def _forward(request: Request, gw: Gateway, path: str,
                   req: CompletionRequest | ChatRequest) -> Response:
    body = req.model_dump(mode="json", exclude_unset=True)  # every field sent, extras too
    model = req.model
    request.state.model = model
    await asyncio.to_thread(_check_limits, gw, req, body)
    is_base = model == gw.reg.base_name
    shape = shape_of("chat" if path.endswith("chat/completions") else "completions", body,
                     adapter=not is_base)
    gw.guard.admit(shape)  # before an adapter is loaded for it
    if not body.get("stream"):
        # whole answers can be replayed: a death of the engine under them is retried once
        return await gw.guard.retry_once(lambda: _whole(gw, path, body, model, shape),
                                         wait_s=gw.settings.start_timeout_s)
    stack = AsyncExitStack()
    handed_off = False
    try:
        engine, identity = await _target(gw, model, stack)
        watch = gw.guard.watch(engine, shape)
        stack.callback(watch.close)
        try:
            upstream = await stack.enter_async_context(
                engine.stream(path, dict(body, model=identity)))
        except EngineError:
            await _raise_death(watch)
            raise
        if upstream.status_code != 200:
            content = (await upstream.aread()).replace(_quoted(identity), _quoted(model))
            if upstream.status_code >= 500:
                await _raise_death(watch)
            return Response(content, upstream.status_code, media_type="application/json")
        handed_off = True
        return StreamingResponse(_relay(gw, upstream, stack, watch, identity, model),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    finally:
        if not handed_off:
            await stack.aclose()


async def _target(gw: Gateway, model: str, stack: AsyncExitStack):
    """The engine and the name to send: the base model's, or the adapter's held version."""
    if model == gw.reg.base_name:
        engine = gw.reg.pick_engine()
        return engine, engine.base_id or model
    served, engine = await stack.enter_async_context(gw.reg.use(model))
    gw.metrics.adapter_requests.labels(model).inc()
    return engine, served.identity


async def _whole(gw: Gateway, path: str, body: dict, model: str, shape) -> Response:
    async with AsyncExitStack() as stack:
        engine, identity = await _target(gw, model, stack)
        response = await gw.guard.post(engine, path, dict(body, model=identity), shape)
    content = response.content.replace(_quoted(identity), _quoted(model))
    _count_usage(gw, model, response)
    return Response(content, response.status_code,
                    media_type=response.headers.get("content-type", "application/json"))


async def _raise_death(watch) -> None:
    died = await watch.failed()
    if died is not None:
        raise died.answer()


async def _relay(gw: Gateway, upstream, stack: AsyncExitStack, watch, identity: str,
                 model: str):
    """SSE lines from vLLM to the client, one by one; the adapter is held until the end."""
    try:
        async for line in upstream.aiter_lines():
            if line.startswith("data: {"):
                if DEAD_ANSWER in line:  # vLLM's engine died mid-answer: say so and why
                    raise EngineError("vLLM's engine died")
                line = line.replace(f'"{identity}"', f'"{model}"')
                if '"usage":{' in line:
                    _count_stream_usage(gw, model, line)
            yield line + "\n"
        watch.succeeded()
    except Exception as exc:  # noqa: BLE001  vLLM failed mid-stream: end with an error event
        died = await watch.failed()
        error = died.answer().body() if died is not None and died.killer else \
            error_body(503, f"the stream was cut: vLLM failed mid-answer ({died or exc}); "
                       f"retry", "engine_unavailable")
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        await stack.aclose()


def _check_limits(gw: Gateway, req: CompletionRequest | ChatRequest, body: dict) -> None:
    """Prompt length, batch and max_tokens limits, checked before vLLM sees the request (the
    types were checked by the request's model)."""
    s, tok = gw.settings, gw.tok
    if isinstance(req, ChatRequest):
        try:
            lengths = [tok.chat_length([_plain(m) for m in body["messages"]])]
        except Exception as exc:  # noqa: BLE001  jinja raises many kinds
            raise ApiError(400, f"the messages do not fit the model's chat template ({exc})",
                           "invalid_value", "messages") from None
    else:
        lengths = _prompt_lengths(tok, req.prompt)
    if len(lengths) * req.n > s.max_batch:
        raise ApiError(400, f"{len(lengths)} prompt(s) x n={req.n} is over the batch limit "
                       f"{s.max_batch}; split the request", "batch_too_large")
    longest = max(lengths)
    if longest > s.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {longest} tokens; the limit is "
                       f"{s.max_prompt_tokens}. Shorten it.", "prompt_too_long",
                       "messages" if isinstance(req, ChatRequest) else "prompt")
    key = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = getattr(req, key)
    if asked is not None:
        if asked > s.max_tokens:
            raise ApiError(400, f"`{key}` is {asked}; the limit is {s.max_tokens}",
                           "max_tokens_too_large", key)
    else:  # a bound on every request, as long as the context leaves room for it
        body["max_tokens"] = max(1, min(s.max_tokens, s.max_model_len - longest))


def _prompt_lengths(tok, prompt: str | list) -> list[int]:
    if isinstance(prompt, str):
        return [len(tok.encode(prompt))]
    if isinstance(prompt[0], int):
        return [len(prompt)]
    return [len(tok.encode(p)) if isinstance(p, str) else len(p) for p in prompt]


def _plain(message: dict) -> dict:
    """Content parts ([{"type": "text", "text": ...}]) joined into text, for counting."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"role": message.get("role", "user"), "content": content or ""}


def _quoted(text: str) -> bytes:
    return json.dumps(text).encode()


def _count_usage(gw: Gateway, model: str, response) -> None:
    try:
        usage = response.json().get("usage") or {}
    except (ValueError, AttributeError):
        return
    _add_tokens(gw, model, usage)


def _count_stream_usage(gw: Gateway, model: str, line: str) -> None:
    with contextlib.suppress(ValueError):
        _add_tokens(gw, model, json.loads(line[6:]).get("usage") or {})


def _add_tokens(gw: Gateway, model: str, usage: dict) -> None:
    for kind in ("prompt", "completion"):
        value = usage.get(f"{kind}_tokens")
        if isinstance(value, int):
            gw.metrics.tokens.labels(model, kind).inc(value)


def _epoch(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0

