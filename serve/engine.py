"""The one engine-facing interface: a vLLM OpenAI server reached over HTTP.

Everything the gateway asks of vLLM goes through `Engine`: health, load/unload of a LoRA under
an identity, and forwarded requests (whole or streamed). An engine is either the vLLM child this
gateway supervises (`process` set) or an upstream started elsewhere. Tests may hand it an httpx
transport (a fake vLLM app) for fast unit tests of the gateway logic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx


class EngineError(RuntimeError):
    """vLLM refused or could not be reached; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class Engine:
    """One vLLM server. `up`/`reason` are kept current by the gateway's supervisor."""

    def __init__(self, url: str, *, timeout_s: float = 600.0,
                 transport: httpx.AsyncBaseTransport | None = None, process: Any = None) -> None:
        self.url = url.rstrip("/")
        self.process = process  # VllmProcess when this gateway started it
        self.up = False
        self.reason = "not checked yet"
        self.generation = 0  # bumped on every (re)start: what was loaded before is gone
        self.base_id: str | None = None  # the base model's name on this server
        self.failed_checks = 0  # consecutive failed health checks
        self.crashed: dict[int, bool] = {}  # generation -> EngineCore raised (vs. was killed)
        self.closed = False  # dropped by the gateway (deregistered): nothing more is sent
        self._timeout = httpx.Timeout(timeout_s, connect=5.0)
        self._transport = transport
        self.client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=self._timeout,
                                 transport=self._transport,
                                 limits=httpx.Limits(max_connections=256,
                                                     max_keepalive_connections=32))

    def __repr__(self) -> str:
        return f"Engine({self.url!r}, up={self.up})"

    async def aclose(self) -> None:
        self.closed, self.up = True, False
        await self.client.aclose()

    async def healthy(self) -> bool:
        if self.closed:
            return False
        try:
            response = await self.client.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def load_lora(self, identity: str, path: str) -> None:
        """Load the adapter directory `path` under the name `identity` (vLLM's runtime API)."""
        response = await self._post("/v1/load_lora_adapter",
                                    {"lora_name": identity, "lora_path": path}, timeout=120.0)
        if response.status_code == 400 and "already been loaded" in response.text:
            return  # identities carry the content hash: the same name means the same weights
        if response.status_code != 200:
            raise EngineError(f"vLLM at {self.url} refused to load {path}: "
                              f"{_error_text(response)}", 502)

    async def unload_lora(self, identity: str) -> None:
        """Forget `identity`; already gone (404) is fine: the goal state is reached."""
        response = await self._post("/v1/unload_lora_adapter", {"lora_name": identity},
                                    timeout=60.0)
        if response.status_code not in (200, 404):
            raise EngineError(f"vLLM at {self.url} refused to unload {identity}: "
                              f"{_error_text(response)}", 502)

    async def served_base(self) -> str | None:
        """The base model's name on this server (the model card without a parent)."""
        try:
            response = await self.client.get("/v1/models", timeout=10.0)
            models = response.json().get("data", [])
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return next((m["id"] for m in models if not m.get("parent")), None)

    async def post_json(self, path: str, body: dict) -> httpx.Response:
        """Forward a request whole; the response is returned as vLLM gave it."""
        return await self._post(path, body)

    @asynccontextmanager
    async def stream(self, path: str, body: dict) -> AsyncIterator[httpx.Response]:
        """Forward a streaming request; the caller iterates the response's lines."""
        self._check_open()
        try:
            async with self.client.stream("POST", path, json=body) as response:
                yield response
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:  # reached, but too slow
            raise EngineError(self._too_slow(exc), 504) from None
        except httpx.TransportError as exc:
            raise EngineError(self._unreachable(exc)) from None

    async def _post(self, path: str, body: dict, timeout: float | None = None) -> httpx.Response:
        self._check_open()
        try:
            if timeout is None:
                return await self.client.post(path, json=body)
            return await self.client.post(path, json=body, timeout=timeout)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:  # reached, but too slow
            raise EngineError(self._too_slow(exc), 504) from None
        except httpx.TransportError as exc:
            raise EngineError(self._unreachable(exc)) from None

    def _too_slow(self, exc: Exception) -> str:
        return (f"vLLM at {self.url} did not answer in time ({type(exc).__name__}; the "
                f"gateway waits {self._timeout.read:g} s, LORASTACK_REQUEST_TIMEOUT_S): ask "
                f"for fewer tokens or send fewer inputs at once, or raise the limit")

    def _check_open(self) -> None:
        if self.closed:
            raise EngineError(f"vLLM at {self.url} has left this gateway ({self.reason}); "
                              f"retry: the request goes to another engine")

    def _unreachable(self, exc: Exception) -> str:
        if isinstance(exc, httpx.ConnectError):  # refused: nobody listens, it is down for sure
            self.up = False
            self.reason = f"unreachable ({type(exc).__name__}: {exc})"
        return (f"vLLM at {self.url} is not reachable ({type(exc).__name__}); it is being "
                f"restarted or checked, retry in a few seconds")


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        if message:
            return f"{response.status_code}: {message}"
    except ValueError:
        pass
    return f"{response.status_code}: {response.text[:500]}"
