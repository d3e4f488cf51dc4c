"""The Python client of the lorastack gateway (`lorastack serve`): every route as a method.

    from lorastack.client import Client

    with Client("http://127.0.0.1:8000") as gw:
        [answer] = gw.classify("reviews-classify", "Works well, no side effects.")
        print(answer.label, f"{answer.confidence:.0%}")
        for piece in gw.stream_chat("smollm2-135m", "Say hello.", max_tokens=20):
            print(piece, end="", flush=True)

`Client` is synchronous, `AsyncClient` has the same methods as coroutines (and async iterators
for the streams). Answers are typed (`ModelCard`, `Classifications`, `Completion`, ...), each
with the gateway's JSON in `raw`. Every failure raises `GatewayError`: an answer other than
success (its `status`, `code` and the gateway's `message`), a stream cut by an error event, or a
gateway that cannot be reached (`status` None).

Keys: `api_key` opens the /v1 routes and `admin_key` load/unload; without them the client reads
LORASTACK_API_KEY and LORASTACK_ADMIN_KEY, and the URL from LORASTACK_SERVER (default
http://127.0.0.1:8000). A loopback gateway started without keys needs none.

It imports httpx, the standard library and its answer types (lorastack/client_answers.py)
only, nothing else of lorastack, so `import lorastack.client` is quick and the client works
against a gateway on any machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Self

import httpx

from lorastack.client_answers import (
    HINTS,
    AdapterChange,
    Adapters,
    AdapterStatus,
    Classifications,
    Classified,
    Completion,
    EngineHealth,
    GatewayError,
    Health,
    LabelScore,
    Member,
    ModelCard,
    Usage,
)

__all__ = [
    "DEFAULT_URL", "HINTS", "AdapterChange", "AdapterStatus", "Adapters", "AsyncClient",
    "Classifications", "Classified", "Client", "Completion", "EngineHealth", "GatewayError",
    "Health", "LabelScore", "Member", "ModelCard", "Usage", "sse_events",
]

DEFAULT_URL = "http://127.0.0.1:8000"
Input = str | Mapping[str, str]
Messages = str | Sequence[Mapping[str, Any]]


# -- the shared part of both clients ---------------------------------------------------------
class _Base:
    def __init__(self, url: str | None, api_key: str | None, admin_key: str | None,
                 timeout: float, hints: Mapping[int, str] | None) -> None:
        self.url = (url or os.environ.get("LORASTACK_SERVER") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LORASTACK_API_KEY")
        self.admin_key = admin_key if admin_key is not None else \
            os.environ.get("LORASTACK_ADMIN_KEY")
        self.hints = dict(HINTS if hints is None else hints)
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _headers(self, admin: bool = False) -> dict[str, str]:
        key = (self.admin_key or self.api_key) if admin else (self.api_key or self.admin_key)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _answer(self, r: httpx.Response, path: str) -> Any:
        if r.status_code >= 400:
            raise GatewayError.from_response(r.status_code, r.content, self.hints)
        try:
            return r.json()
        except ValueError:
            raise GatewayError(f"the gateway answered {path} with something that is not JSON: "
                               f"{r.text[:200]!r}", r.status_code) from None

    def _health(self, r: httpx.Response) -> Health:
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            raise GatewayError.from_response(r.status_code, r.content, self.hints)
        return Health.from_json(body)

    def _unreachable(self, exc: Exception) -> GatewayError:
        if isinstance(exc, httpx.TimeoutException):
            return GatewayError(f"the gateway at {self.url} did not answer in time "
                                f"({type(exc).__name__}); it may be busy: retry, or ask for "
                                f"less", code="timeout")
        return GatewayError(f"cannot reach the gateway at {self.url} ({type(exc).__name__}: "
                            f"{exc}); is `lorastack serve` running there?", code="unreachable")

    def _pieces(self, event: dict, piece: Callable[[dict], str | None]) -> Iterator[str]:
        if "error" in event:
            raise GatewayError.from_event(event, self.hints)
        for choice in event.get("choices") or []:
            text = piece(choice)
            if text:
                yield text


def _classify_body(model: str | Sequence[str], inputs: Input | Sequence[Input],
                   top_k: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model if isinstance(model, str) else list(model),
                            "input": _inputs(inputs)}
    if top_k is not None:
        body["top_k"] = top_k
    return body


def _inputs(inputs: Input | Sequence[Input]) -> str | list:
    if isinstance(inputs, str):
        return inputs
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    return [item if isinstance(item, str) else dict(item) for item in inputs]


def _messages(messages: Messages) -> list[dict[str, Any]]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _generation(model: str, key: str, value: Any, params: Mapping[str, Any],
                stream: bool) -> dict[str, Any]:
    if "stream" in params:
        raise TypeError("pass no `stream`: complete()/chat() answer whole, stream_complete()/"
                        "stream_chat() stream")
    body = {"model": model, key: value, **{k: v for k, v in params.items() if v is not None}}
    if stream:
        body["stream"] = True
    return body


def _text_piece(choice: dict) -> str | None:
    return choice.get("text")


def _chat_piece(choice: dict) -> str | None:
    return (choice.get("delta") or {}).get("content")


_DONE = object()


def _sse_data(line: str) -> Any:
    """One line of a server-sent event stream: its JSON object, _DONE at `[DONE]`, or None for
    a line that carries no data (comments, blank lines between events)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise GatewayError(f"the gateway sent a stream line that is not JSON: "
                           f"{data[:200]!r}") from None


def sse_events(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream (`data: {...}` lines) up to `[DONE]`."""
    for line in lines:
        event = _sse_data(line)
        if event is _DONE:
            return
        if event is not None:
            yield event


def _merge(parts: list[Classifications]) -> Classifications:
    if not parts:
        return Classifications(model="", labels=(), data=())
    usage = Usage()
    for part in parts:
        usage += part.usage
    return Classifications(model=parts[0].model, labels=parts[0].labels,
                           data=tuple(c for part in parts for c in part.data), usage=usage)


def _next_batch(exc: GatewayError, size: int) -> int:
    """The smaller batch to retry with when the gateway's --max-batch refused `size` inputs."""
    if exc.code != "batch_too_large" or size == 1:
        raise exc
    return max(1, size // 2)


# -- the clients ----------------------------------------------------------------------------
class Client(_Base):
    """The gateway's routes as methods (synchronous). Use it as a context manager, or call
    close(). `hints` replaces HINTS, the advice added to an error's message by status."""

    def __init__(self, url: str | None = None, api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 300.0, *,
                 hints: Mapping[int, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, api_key, admin_key, timeout, hints)
        self._http = httpx.Client(base_url=self.url, timeout=self._timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, method: str, path: str, admin: bool = False, **kw: Any) -> Any:
        try:
            r = self._http.request(method, path, headers=self._headers(admin), **kw)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return self._answer(r, path)

    # -- routes -------------------------------------------------------------------------------
    def health(self) -> Health:
        """GET /health (no key needed). A gateway without a live engine answers `ok` False;
        one that cannot be reached raises."""
        try:
            r = self._http.get("/health")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return self._health(r)

    def models(self) -> list[ModelCard]:
        """GET /v1/models: the base model first, then every served adapter's card."""
        return [ModelCard.from_json(c) for c in self._request("GET", "/v1/models")["data"]]

    def classify(self, model: str | Sequence[str], inputs: Input | Sequence[Input],
                 top_k: int | None = None) -> Classifications:
        """POST /v1/classify: label probabilities for one input or a batch (at most the
        gateway's --max-batch; classify_many() splits any number). `model` is a
        classification adapter, or a list of several with one label set (an ensemble: their
        mean, each member's answer in `members`). An input is a text, or a record of the fields
        the adapter's prompt template names."""
        return Classifications.from_json(
            self._request("POST", "/v1/classify", json=_classify_body(model, inputs, top_k)))

    def classify_many(self, model: str | Sequence[str], inputs: Sequence[Input],
                      batch_size: int = 16, top_k: int | None = None,
                      on_batch: Callable[[int, int], None] | None = None) -> Classifications:
        """Classify any number of inputs, `batch_size` per request, answers in input order;
        `on_batch(done, total)` is called after each request. A gateway whose --max-batch is
        lower gets halved batches until they fit."""
        parts: list[Classifications] = []
        done = 0
        while done < len(inputs):
            batch = list(inputs[done:done + batch_size])
            try:
                answer = Classifications.from_json(self._request(
                    "POST", "/v1/classify", json=_classify_body(model, batch, top_k)), done)
            except GatewayError as exc:
                batch_size = _next_batch(exc, batch_size)
                continue
            parts.append(answer)
            done += len(batch)
            if on_batch:
                on_batch(done, len(inputs))
        return _merge(parts)

    def complete(self, model: str, prompt: str | Sequence[str], **params: Any) -> Completion:
        """POST /v1/completions: the whole answer. `params` are OpenAI's (and vLLM's) sampling
        fields: max_tokens, temperature, top_p, stop, seed, n, ..."""
        body = _generation(model, "prompt", prompt, params, stream=False)
        return Completion.from_json(self._request("POST", "/v1/completions", json=body))

    def chat(self, model: str, messages: Messages, **params: Any) -> Completion:
        """POST /v1/chat/completions: the whole reply. `messages` is OpenAI's list of
        {role, content}, or one text (a single user message)."""
        body = _generation(model, "messages", _messages(messages), params, stream=False)
        return Completion.from_json(self._request("POST", "/v1/chat/completions", json=body))

    def stream_complete(self, model: str, prompt: str, **params: Any) -> Iterator[str]:
        """POST /v1/completions with stream=true: the text's pieces as the server emits them."""
        body = _generation(model, "prompt", prompt, params, stream=True)
        return self._stream("/v1/completions", body, _text_piece)

    def stream_chat(self, model: str, messages: Messages, **params: Any) -> Iterator[str]:
        """POST /v1/chat/completions with stream=true: the reply's pieces as they come."""
        body = _generation(model, "messages", _messages(messages), params, stream=True)
        return self._stream("/v1/chat/completions", body, _chat_piece)

    def adapters(self) -> Adapters:
        """GET /v1/adapters: what is loaded where, and the store entries the gateway refused."""
        return Adapters.from_json(self._request("GET", "/v1/adapters"))

    def load(self, name: str) -> AdapterChange:
        """POST /v1/adapters/load (admin key): load an adapter of the server's store now."""
        return AdapterChange.from_json(
            self._request("POST", "/v1/adapters/load", admin=True, json={"name": name}))

    def unload(self, name: str) -> AdapterChange:
        """POST /v1/adapters/unload (admin key): stop serving it until it is loaded again."""
        return AdapterChange.from_json(
            self._request("POST", "/v1/adapters/unload", admin=True, json={"name": name}))

    def _stream(self, path: str, body: dict, piece: Callable[[dict], str | None]
                ) -> Iterator[str]:
        try:
            with self._http.stream("POST", path, json=body, headers=self._headers()) as r:
                if r.status_code >= 400:
                    raise GatewayError.from_response(r.status_code, r.read(), self.hints)
                for event in sse_events(r.iter_lines()):
                    yield from self._pieces(event, piece)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None


class AsyncClient(_Base):
    """The same methods as `Client`, as coroutines; the streams are async iterators:

        async with AsyncClient() as gw:
            answers = await gw.classify("reviews-classify", ["Great.", "Awful."])
            async for piece in gw.stream_complete("smollm2-135m", "Once upon a time"):
                ...
    """

    def __init__(self, url: str | None = None, api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 300.0, *,
                 hints: Mapping[int, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, api_key, admin_key, timeout, hints)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=self._timeout,
                                       transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _request(self, method: str, path: str, admin: bool = False, **kw: Any) -> Any:
        try:
            r = await self._http.request(method, path, headers=self._headers(admin), **kw)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return self._answer(r, path)

    async def health(self) -> Health:
        try:
            r = await self._http.get("/health")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        return self._health(r)

    async def models(self) -> list[ModelCard]:
        answer = await self._request("GET", "/v1/models")
        return [ModelCard.from_json(c) for c in answer["data"]]

    async def classify(self, model: str | Sequence[str], inputs: Input | Sequence[Input],
                       top_k: int | None = None) -> Classifications:
        return Classifications.from_json(await self._request(
            "POST", "/v1/classify", json=_classify_body(model, inputs, top_k)))

    async def classify_many(self, model: str | Sequence[str], inputs: Sequence[Input],
                            batch_size: int = 16, top_k: int | None = None,
                            on_batch: Callable[[int, int], None] | None = None
                            ) -> Classifications:
        parts: list[Classifications] = []
        done = 0
        while done < len(inputs):
            batch = list(inputs[done:done + batch_size])
            try:
                answer = Classifications.from_json(await self._request(
                    "POST", "/v1/classify", json=_classify_body(model, batch, top_k)), done)
            except GatewayError as exc:
                batch_size = _next_batch(exc, batch_size)
                continue
            parts.append(answer)
            done += len(batch)
            if on_batch:
                on_batch(done, len(inputs))
        return _merge(parts)

    async def complete(self, model: str, prompt: str | Sequence[str],
                       **params: Any) -> Completion:
        body = _generation(model, "prompt", prompt, params, stream=False)
        return Completion.from_json(await self._request("POST", "/v1/completions", json=body))

    async def chat(self, model: str, messages: Messages, **params: Any) -> Completion:
        body = _generation(model, "messages", _messages(messages), params, stream=False)
        return Completion.from_json(
            await self._request("POST", "/v1/chat/completions", json=body))

    def stream_complete(self, model: str, prompt: str, **params: Any) -> AsyncIterator[str]:
        body = _generation(model, "prompt", prompt, params, stream=True)
        return self._stream("/v1/completions", body, _text_piece)

    def stream_chat(self, model: str, messages: Messages, **params: Any) -> AsyncIterator[str]:
        body = _generation(model, "messages", _messages(messages), params, stream=True)
        return self._stream("/v1/chat/completions", body, _chat_piece)

    async def adapters(self) -> Adapters:
        return Adapters.from_json(await self._request("GET", "/v1/adapters"))

    async def load(self, name: str) -> AdapterChange:
        return AdapterChange.from_json(await self._request(
            "POST", "/v1/adapters/load", admin=True, json={"name": name}))

    async def unload(self, name: str) -> AdapterChange:
        return AdapterChange.from_json(await self._request(
            "POST", "/v1/adapters/unload", admin=True, json={"name": name}))

    async def _stream(self, path: str, body: dict, piece: Callable[[dict], str | None]
                      ) -> AsyncIterator[str]:
        try:
            async with self._http.stream("POST", path, json=body,
                                         headers=self._headers()) as r:
                if r.status_code >= 400:
                    raise GatewayError.from_response(r.status_code, await r.aread(),
                                                     self.hints)
                async for line in r.aiter_lines():
                    event = _sse_data(line)
                    if event is _DONE:
                        return
                    if event is not None:
                        for text in self._pieces(event, piece):
                            yield text
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
