"""Request and response models of the gateway's own routes, and its error shape.

Errors use OpenAI's shape, {"error": {"message", "type", "code", "param"}}, so that OpenAI
clients raise their usual exceptions with our message in them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator


class ApiError(Exception):
    """An answer other than success; `message` says what was wrong and what to do."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error",
             403: "permission_error", 404: "not_found_error", 409: "conflict_error",
             413: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 502: "upstream_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = ApiError.TYPES.get(status, "server_error" if status >= 500 else
                              "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong and what to do")
    type: str
    code: str = Field(description="a stable machine-readable name of the error")
    param: str | None = Field(None, description="the request field at fault, if one is")


class ErrorResponse(BaseModel):
    """Every answer other than success (OpenAI's error shape)."""

    error: ErrorDetail


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Open(BaseModel):
    """OpenAI's requests: the fields the gateway checks; every other field goes to vLLM as is."""

    model_config = ConfigDict(extra="allow")


_Ids = Annotated[list[StrictInt], Field(min_length=1)]
_Texts = Annotated[list[str], Field(min_length=1)]
_PositiveInt = Annotated[StrictInt, Field(ge=1)]


class _Generation(_Open):
    model: str = Field(min_length=1, description="the base model or an adapter name (GET "
                       "/v1/models lists them)")
    n: _PositiveInt = Field(1, description="completions per prompt")
    max_tokens: _PositiveInt | None = Field(None, description="at most the server's "
                                            "--max-tokens; default: that limit, or what the "
                                            "context leaves")
    max_completion_tokens: _PositiveInt | None = Field(None, description="as max_tokens")
    stream: bool | None = Field(False, description="relay tokens as server-sent events")


class CompletionRequest(_Generation):
    """POST /v1/completions (OpenAI's; other OpenAI and vLLM sampling fields are forwarded)."""

    prompt: str | _Ids | _Texts | Annotated[list[_Ids], Field(min_length=1)] = Field(
        description="a text, a list of texts, a list of token ids, or a list of such lists")


class ChatMessage(_Open):
    role: str = Field(min_length=1, description="system, user or assistant")
    content: str | list[dict[str, Any]] | None = Field(
        None, description="text, or OpenAI's content parts ([{\"type\": \"text\", ...}])")


class ChatRequest(_Generation):
    """POST /v1/chat/completions (OpenAI's; other fields are forwarded)."""

    messages: list[ChatMessage] = Field(min_length=1)


class CompletionChoice(_Open):
    index: int
    text: str | None = None
    message: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(_Open):
    """vLLM's answer, with the adapter's public name as `model` (streamed: SSE chunks of the
    same shape, then `data: [DONE]`)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: dict[str, Any] | None = None


class LoraInfo(BaseModel):
    rank: int
    alpha: int | float
    target_modules: list[str]


class ModelCard(BaseModel):
    """One entry of GET /v1/models: OpenAI's model object plus what lorastack knows of it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorastack"
    root: str
    parent: str | None = Field(description="the base model of an adapter; null for the base")
    task: str = Field(description="classification or generation")
    max_model_len: int | None = None
    labels: list[str] | None = None
    examples: list[Any] | None = Field(None, description="validation inputs to try")
    lora: LoraInfo | None = None
    metrics: dict[str, Any] | None = Field(None, description="validation and test metrics")
    members: dict[str, float] | None = Field(
        None, description="an ensemble's member adapters and their weights in its mixture")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ClassifyRequest(_Strict):
    """POST /v1/classify."""

    model: str | list[str] = Field(description="a classification adapter, or several with the "
                                   "same label set (their answers are averaged)")
    input: str | list[str | dict[str, str]] = Field(
        description="one text, or a batch; an item may be a record of the fields the adapter's "
        "prompt template uses ({\"text\": ..., \"drug\": ...})")
    top_k: int | None = Field(None, ge=1, description="return only the k most probable labels "
                              "in `top` (probabilities always holds every label)")

    @field_validator("model")
    @classmethod
    def _models(cls, value: str | list[str]) -> list[str]:
        names = [value] if isinstance(value, str) else list(value)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("model must be an adapter name or a non-empty list of them")
        if len(set(names)) != len(names):
            raise ValueError(f"model lists an adapter twice: {names}")
        return names

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list) -> list[dict[str, str]]:
        items = [value] if isinstance(value, str) else list(value)
        if not items:
            raise ValueError("input must be a string or a non-empty list")
        return [{"text": item} if isinstance(item, str) else item for item in items]

    @property
    def models(self) -> list[str]:
        """`model` as the validator left it: a list of names."""
        return cast(list[str], self.model)

    @property
    def records(self) -> list[dict[str, str]]:
        """`input` as the validator left it: one record per input."""
        return cast(list[dict[str, str]], self.input)


class LabelScore(BaseModel):
    label: str
    probability: float


class MemberAnswer(BaseModel):
    label: str
    probabilities: dict[str, float]


class Classification(BaseModel):
    index: int
    label: str = Field(description="the most probable label")
    probabilities: dict[str, float] = Field(description="every label, summing to 1")
    top: list[LabelScore] = Field(description="labels by probability (top_k of them)")
    members: dict[str, MemberAnswer] | None = Field(
        None, description="with several models: each member's own answer")


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    object: str = "classification"
    model: str
    labels: list[str]
    data: list[Classification]
    usage: ClassifyUsage


class AdapterAction(_Strict):
    """POST /v1/adapters/load and /v1/adapters/unload."""

    name: str


class AdapterStatus(BaseModel):
    name: str
    identity: str = Field(description="the name vLLM knows this version by: name@content hash")
    task: str
    labels: list[str]
    loaded_on: list[str] = Field(description="engines that hold it now")
    inflight: int = Field(description="requests running on it")


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    capacity: int = Field(description="adapters kept loaded per engine")
    data: list[AdapterStatus]
    draining: list[str] = Field(description="replaced versions finishing their requests")
    unloaded: list[str] = Field(description="unloaded by hand")
    refused: dict[str, str] = Field(description="store entries not served, and why")


class AdapterLoaded(AdapterStatus):
    status: Literal["loaded"] = "loaded"


class AdapterUnloaded(BaseModel):
    status: Literal["unloaded"] = "unloaded"
    name: str
    note: str


class EngineHealth(BaseModel):
    url: str
    up: bool
    reason: str
    adapters_loaded: int


class RefusedShape(BaseModel):
    shape: str
    why: str


class Health(BaseModel):
    """GET /health: 200 when at least one vLLM engine is up, 503 when none is."""

    status: Literal["ok", "unavailable"]
    gateway: Literal["ok"] = "ok"
    vllm: list[EngineHealth]
    adapters: int
    engine_deaths: int
    refused_shapes: list[RefusedShape] = Field(
        description="request shapes refused because they killed the engine")
