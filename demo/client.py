"""An HTTP client of the lorastack gateway: all the page knows about the server.

It imports nothing of ours (only httpx), so the page works the same against a gateway on this
laptop or on a GPU server. Every failure becomes a `GatewayError` whose message a person can
read: the gateway's own message (OpenAI's error shape), or what to do when it cannot be reached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


class GatewayError(Exception):
    """A request that did not succeed; `str()` is a message to show as is."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def error_message(status: int, body: bytes | str) -> str:
    """A readable message for an error answer: the gateway's `error.message` when the body has
    OpenAI's error shape (FastAPI's `detail` otherwise), else a short excerpt of the body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    message = None
    if isinstance(parsed, dict):
        err = parsed.get("error")
        if isinstance(err, dict) and err.get("message"):
            message = str(err["message"])
        elif isinstance(err, str):
            message = err
        elif parsed.get("detail"):
            message = str(parsed["detail"])
    if message is None:
        message = " ".join(text.split())[:300] or "no details"
    hint = {401: " (give the page an API key: `lorastack demo --api-key KEY`)",
            403: " (load/unload needs the admin key: `lorastack demo --admin-key KEY`)",
            503: " (the model server is starting or restarting; retry in a moment)"}
    return f"gateway error {status}: {message}{hint.get(status, '')}"


@dataclass
class Classified:
    """One input's answer from /v1/classify."""

    label: str
    probabilities: dict[str, float]
    members: dict[str, dict] | None = None

    @property
    def confidence(self) -> float:
        return self.probabilities[self.label]


class GatewayClient:
    """The gateway's routes as methods. `api_key` opens the /v1 routes, `admin_key` load/unload
    (either may be None on a loopback gateway that needs no keys)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 admin_key: str | None = None, timeout: float = 300.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key, self.admin_key = api_key, admin_key
        self._http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout, connect=5),
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _headers(self, admin: bool = False) -> dict[str, str]:
        key = (self.admin_key or self.api_key) if admin else (self.api_key or self.admin_key)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _request(self, method: str, path: str, admin: bool = False, **kw) -> Any:
        try:
            r = self._http.request(method, path, headers=self._headers(admin), **kw)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        if r.status_code >= 400:
            raise GatewayError(error_message(r.status_code, r.content), r.status_code,
                               _code(r.content))
        try:
            return r.json()
        except ValueError:
            raise GatewayError(f"the gateway answered {path} with something that is not JSON: "
                               f"{r.text[:200]!r}", r.status_code) from None

    def _unreachable(self, exc: Exception) -> GatewayError:
        if isinstance(exc, httpx.TimeoutException):
            return GatewayError(f"the gateway at {self.url} did not answer in time ({exc!r}); "
                                f"it may be busy, retry or ask for less")
        return GatewayError(f"cannot reach the gateway at {self.url} ({type(exc).__name__}: "
                            f"{exc}); is `lorastack serve` running there?")

    # -- routes -----------------------------------------------------------------------------
    def health(self) -> dict:
        try:
            r = self._http.get("/health")
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None
        try:
            return r.json()
        except ValueError:
            raise GatewayError(error_message(r.status_code, r.content), r.status_code) from None

    def models(self) -> list[dict]:
        """GET /v1/models: the base model first, then every served adapter's card."""
        return self._request("GET", "/v1/models")["data"]

    def adapters(self) -> dict:
        """GET /v1/adapters: what is loaded where, and the adapters the gateway refused."""
        return self._request("GET", "/v1/adapters")

    def load(self, name: str) -> dict:
        return self._request("POST", "/v1/adapters/load", admin=True, json={"name": name})

    def unload(self, name: str) -> dict:
        return self._request("POST", "/v1/adapters/unload", admin=True, json={"name": name})

    def classify(self, model: str | Sequence[str], texts: str | Sequence[str]) -> list[Classified]:
        """POST /v1/classify for one batch (at most the gateway's --max-batch inputs)."""
        body = {"model": model if isinstance(model, str) else list(model),
                "input": texts if isinstance(texts, str) else list(texts)}
        answer = self._request("POST", "/v1/classify", json=body)
        return [Classified(d["label"], d["probabilities"], d.get("members"))
                for d in answer["data"]]

    def classify_many(self, model: str | Sequence[str], texts: Sequence[str],
                      batch_size: int = 16,
                      on_batch: Callable[[int, int], None] | None = None) -> list[Classified]:
        """Classify any number of texts, `batch_size` per request; `on_batch(done, total)` is
        called after each request (the page moves its progress bar with it). A gateway whose
        batch limit (--max-batch) is lower gets halved batches until they fit."""
        results: list[Classified] = []
        while len(results) < len(texts):
            batch = texts[len(results):len(results) + batch_size]
            try:
                results += self.classify(model, batch)
            except GatewayError as exc:
                if exc.code != "batch_too_large" or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                continue
            if on_batch:
                on_batch(len(results), len(texts))
        return results

    def stream_completion(self, model: str, prompt: str, **params) -> Iterator[str]:
        """POST /v1/completions with stream=true: the text pieces as the server emits them."""
        yield from self._stream("/v1/completions", {"model": model, "prompt": prompt, **params},
                                lambda choice: choice.get("text"))

    def stream_chat(self, model: str, messages: list[dict], **params) -> Iterator[str]:
        """POST /v1/chat/completions with stream=true: the reply's pieces as they come."""
        yield from self._stream("/v1/chat/completions",
                                {"model": model, "messages": messages, **params},
                                lambda choice: (choice.get("delta") or {}).get("content"))

    def _stream(self, path: str, body: dict, piece: Callable[[dict], str | None]) -> Iterator[str]:
        body = {k: v for k, v in body.items() if v is not None}
        body["stream"] = True
        try:
            with self._http.stream("POST", path, json=body, headers=self._headers()) as r:
                if r.status_code >= 400:
                    raise GatewayError(error_message(r.status_code, r.read()), r.status_code,
                                       _code(r.content))
                for event in sse_events(r.iter_lines()):
                    if "error" in event:
                        raise GatewayError(error_message(503, json.dumps(event)), 503)
                    for choice in event.get("choices") or []:
                        text = piece(choice)
                        if text:
                            yield text
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None


def sse_events(lines: Iterator[str]) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream (`data: {...}` lines) up to `[DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            try:
                yield json.loads(data)
            except ValueError:
                raise GatewayError(f"the gateway sent a stream line that is not JSON: "
                                   f"{data[:200]!r}") from None


def _code(body: bytes) -> str | None:
    try:
        err = json.loads(body).get("error")
        return err.get("code") if isinstance(err, dict) else None
    except (ValueError, AttributeError):
        return None
