"""Request and response models of the gateway's own routes, and its error shape.

Errors use OpenAI's shape, {"error": {"message", "type", "code", "param"}}, so that OpenAI
clients raise their usual exceptions with our message in them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    loaded_on: list[str]
    inflight: int
