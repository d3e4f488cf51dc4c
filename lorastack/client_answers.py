"""The answers of the lorastack gateway as typed objects, and its errors: what
`lorastack.client` returns and raises (it re-exports every name here; import them from there).
Each answer keeps the gateway's JSON in `raw`. Standard library only."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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


def _choice_text(choice: Mapping[str, Any]) -> str:
    if "message" in choice:
        return (choice.get("message") or {}).get("content") or ""
    return choice.get("text") or ""


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
