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

It imports httpx and the standard library only, nothing else of lorastack, so `import
lorastack.client` is quick and the client works against a gateway on any machine.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

__all__ = [
    "DEFAULT_URL", "HINTS", "AdapterChange", "AdapterStatus", "Adapters", "AsyncClient",
    "Classifications", "Classified", "Client", "Completion", "EngineHealth", "GatewayError",
    "Health", "LabelScore", "Member", "ModelCard", "Usage", "sse_events",
]

DEFAULT_URL = "http://127.0.0.1:8000"
# What to do about an error, by HTTP status; shown after the gateway's message. A program with
# its own flags (the Gradio page) passes its own hints.
HINTS: dict[int, str] = {
    401: "give the client the gateway's API key: api_key=... or LORASTACK_API_KEY",
    403: "load/unload needs the admin key: admin_key=... or LORASTACK_ADMIN_KEY",
    503: "the model server is starting or restarting; retry in a moment",
}
# OpenAI's error `type` -> HTTP status, for an error that arrives inside a stream (no status)
_TYPE_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                "permission_error": 403, "not_found_error": 404, "conflict_error": 409,
                "rate_limit_error": 429, "server_error": 500, "upstream_error": 502,
                "service_unavailable": 503}

Input = str | Mapping[str, str]
Messages = str | Sequence[Mapping[str, Any]]


# -- errors ---------------------------------------------------------------------------------
class GatewayError(Exception):
    """A request that did not succeed. `message` is the gateway's own (OpenAI's error shape),
    `status` the HTTP status (None when the gateway could not be reached), `code` the gateway's
    machine-readable name of the error ("batch_too_large", "model_not_found", ...), `param` the
    request field at fault. `str()` is a message to show a person as is."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, *,
                 type: str | None = None, param: str | None = None,
                 hint: str | None = None) -> None:
        self.message, self.status, self.code = message, status, code
        self.type, self.param, self.hint = type, param, hint
        super().__init__(self._text())

    def _text(self) -> str:
        text = self.message if self.status is None else \
            f"gateway error {self.status}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    @classmethod
    def from_response(cls, status: int, body: bytes | str,
                      hints: Mapping[int, str] = HINTS) -> GatewayError:
        """The error of an answer: `error.message` when the body has OpenAI's error shape
        (vLLM's top-level `message`, FastAPI's `detail` otherwise), else an excerpt of it."""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        err: dict = {}
        message = None
        if isinstance(parsed, dict):
            if isinstance(parsed.get("error"), dict):
                err = parsed["error"]
                message = err.get("message")
            elif isinstance(parsed.get("error"), str):
                message = parsed["error"]
            elif parsed.get("message"):
                err, message = parsed, parsed["message"]
            elif parsed.get("detail"):
                message = _detail(parsed["detail"])
        if not message:
            message = " ".join(text.split())[:300] or "no details"
        code = err.get("code")
        return cls(str(message), status, None if code is None else str(code),
                   type=err.get("type"), param=err.get("param"), hint=hints.get(status))

    @classmethod
    def from_event(cls, event: Mapping, hints: Mapping[int, str] = HINTS) -> GatewayError:
        """An `{"error": ...}` event in a stream: the answer had begun (HTTP 200), so the
        status is the one its error type stands for."""
        err = event.get("error")
        err = err if isinstance(err, dict) else {"message": str(err)}
        status = _TYPE_STATUS.get(str(err.get("type")), 503)
        code = err.get("code")
        return cls(str(err.get("message") or "the stream ended with an error"), status,
                   None if code is None else str(code), type=err.get("type"),
                   param=err.get("param"), hint=hints.get(status))


def _detail(detail: Any) -> str:
    """FastAPI's `detail`: a text, or its validation errors ([{loc, msg}, ...]) in one line."""
    if not isinstance(detail, list):
        return str(detail)
    return "; ".join(f"{'.'.join(str(p) for p in d.get('loc') or ())}: {d.get('msg')}"
                     if isinstance(d, dict) else str(d) for d in detail)


# -- answers --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCard:
    """One entry of GET /v1/models: the base model (parent None) or a served adapter."""

    id: str
    task: str  # "generation" or "classification"
    parent: str | None = None  # an adapter's base model; None for the base model itself
    labels: tuple[str, ...] = ()  # a classification adapter's labels, in its order
    examples: tuple[Any, ...] = ()  # validation inputs to try (texts, or records)
    metrics: dict[str, Any] = field(default_factory=dict)  # {"validation": {...}, "test": ...}
    lora: dict[str, Any] | None = None  # rank, alpha, target_modules
    created: int = 0  # epoch seconds
    max_model_len: int | None = None
    members: dict[str, float] | None = None  # a stored ensemble's adapters and their weights
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_base(self) -> bool:
        return self.parent is None

    @classmethod
    def from_json(cls, card: Mapping[str, Any]) -> ModelCard:
        return cls(id=card["id"], task=card.get("task") or "generation",
                   parent=card.get("parent"), labels=tuple(card.get("labels") or ()),
                   examples=tuple(card.get("examples") or ()),
                   metrics={k: v for k, v in (card.get("metrics") or {}).items()
                            if v is not None},
                   lora=card.get("lora"), created=int(card.get("created") or 0),
                   max_model_len=card.get("max_model_len"), members=card.get("members"),
                   raw=dict(card))


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float


@dataclass(frozen=True)
class Member:
    """One member's own answer inside an ensemble."""

    label: str
    probabilities: dict[str, float]

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


@dataclass(frozen=True)
class Classified:
    """One input's answer from /v1/classify."""

    label: str  # the most probable label
    probabilities: dict[str, float]  # every label, summing to 1
    members: dict[str, Member] | None = None  # with several models: each member's answer
    index: int = 0  # the input's position in the request
    top: tuple[LabelScore, ...] = ()  # labels by probability (top_k of them)

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]

    @classmethod
    def from_json(cls, item: Mapping[str, Any], index: int | None = None) -> Classified:
        members = item.get("members")
        return cls(label=item["label"], probabilities=dict(item["probabilities"]),
                   members={n: Member(m["label"], dict(m["probabilities"]))
                            for n, m in members.items()} if members else None,
                   index=item.get("index", 0) if index is None else index,
                   top=tuple(LabelScore(t["label"], t["probability"])
                             for t in item.get("top") or ()))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_json(cls, usage: Mapping[str, Any] | None) -> Usage:
        usage = usage or {}
        return cls(*(int(usage.get(k) or 0)
                     for k in ("prompt_tokens", "completion_tokens", "total_tokens")))

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.completion_tokens + other.completion_tokens,
                     self.total_tokens + other.total_tokens)


@dataclass(frozen=True)
class Classifications(Sequence[Classified]):
    """The answer of /v1/classify: one `Classified` per input, in input order (index it, or
    iterate over it), with the label set and the tokens scored."""

    model: str  # the adapter, or the ensemble's members joined by ","
    labels: tuple[str, ...]
    data: tuple[Classified, ...]
    usage: Usage = Usage()

    def __getitem__(self, i):  # type: ignore[override]
        return self.data[i]

    def __len__(self) -> int:
        return len(self.data)

    @classmethod
    def from_json(cls, answer: Mapping[str, Any], start: int = 0) -> Classifications:
        data = answer.get("data") or []
        return cls(model=answer.get("model", ""), labels=tuple(answer.get("labels") or ()),
                   data=tuple(Classified.from_json(d, start + i) for i, d in enumerate(data)),
                   usage=Usage.from_json(answer.get("usage")))


@dataclass(frozen=True)
class Completion:
    """A whole answer of /v1/completions or /v1/chat/completions."""

    text: str  # the first choice's text (or chat reply)
    choices: tuple[str, ...]  # every choice's text, by index (several prompts, or n > 1)
    finish_reason: str | None  # the first choice's: "stop", "length", ...
    model: str
    usage: Usage
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, answer: Mapping[str, Any]) -> Completion:
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        texts = tuple(_choice_text(c) for c in choices)
        return cls(text=texts[0] if texts else "", choices=texts,
                   finish_reason=choices[0].get("finish_reason") if choices else None,
                   model=answer.get("model", ""), usage=Usage.from_json(answer.get("usage")),
                   raw=dict(answer))


@dataclass(frozen=True)
class AdapterStatus:
    """One served adapter in GET /v1/adapters."""

    name: str
    identity: str  # the version vLLM knows: name@content hash
    task: str
    labels: tuple[str, ...]
    loaded_on: tuple[str, ...]  # the engines that hold it now (empty: served, loaded lazily)
    inflight: int  # requests running on it

    @classmethod
    def from_json(cls, s: Mapping[str, Any]) -> AdapterStatus:
        return cls(s["name"], s.get("identity", ""), s.get("task", ""),
                   tuple(s.get("labels") or ()), tuple(s.get("loaded_on") or ()),
                   int(s.get("inflight") or 0))


@dataclass(frozen=True)
class Adapters:
    """GET /v1/adapters: what is served and loaded where, and what the gateway refused."""

    data: tuple[AdapterStatus, ...]
    capacity: int | None = None  # adapters kept loaded per engine
    draining: tuple[str, ...] = ()  # replaced versions finishing their requests
    unloaded: tuple[str, ...] = ()  # unloaded by hand
    refused: dict[str, str] = field(default_factory=dict)  # store entries not served, and why
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def names(self) -> list[str]:
        return [a.name for a in self.data]

    @classmethod
    def from_json(cls, answer: Mapping[str, Any]) -> Adapters:
        return cls(tuple(AdapterStatus.from_json(s) for s in answer.get("data") or ()),
                   answer.get("capacity"), tuple(answer.get("draining") or ()),
                   tuple(answer.get("unloaded") or ()), dict(answer.get("refused") or {}),
                   raw=dict(answer))


@dataclass(frozen=True)
class AdapterChange:
    """The answer of load (status "loaded", with the adapter's state) or unload ("unloaded")."""

    status: str
    name: str
    adapter: AdapterStatus | None = None
    note: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, answer: Mapping[str, Any]) -> AdapterChange:
        return cls(answer.get("status", ""), answer.get("name", ""),
                   AdapterStatus.from_json(answer) if "identity" in answer else None,
                   answer.get("note"), raw=dict(answer))


@dataclass(frozen=True)
class EngineHealth:
    url: str
    up: bool
    reason: str = ""
    adapters_loaded: int = 0


@dataclass(frozen=True)
class Health:
    """GET /health. `ok` when at least one vLLM engine is up (the gateway answers 503 with the
    same body, and the reasons, when none is; health() returns it rather than raising)."""

    status: str  # "ok" or "unavailable"
    engines: tuple[EngineHealth, ...]
    adapters: int = 0  # adapters served
    engine_deaths: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Health:
        return cls(str(body.get("status", "")),
                   tuple(EngineHealth(e.get("url", ""), bool(e.get("up")), e.get("reason") or "",
                                      int(e.get("adapters_loaded") or 0))
                         for e in body.get("vllm") or ()),
                   int(body.get("adapters") or 0), int(body.get("engine_deaths") or 0),
                   raw=dict(body))


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


def _choice_text(choice: Mapping[str, Any]) -> str:
    if "message" in choice:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


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
