"""lorastack's `vllm.endpoint_plugins` entry: what it adds to vLLM's own API server.

vLLM loads endpoint plugins only when VLLM_PLUGINS names them (VLLM_PLUGINS=lorastack, which
also keeps the general plugin of the same name). Today it adds one thing: when the store
resolver (resolver.py) refused an adapter, vLLM's 404 for that model ("The model `x` does not
exist") carries lorastack's reason, so a client learns what to fix without reading the log.
"""

from __future__ import annotations

import json
import re
from typing import Any

_NOT_FOUND = re.compile(r"The model `(?P<name>.+?)` does not exist")


class LorastackEndpoints:
    """The EndpointPlugin vLLM instantiates (vllm/plugins/endpoint_plugins/interface.py)."""

    name = "lorastack"
    required_tasks = None

    def attach_router(self, app: Any) -> None:
        app.add_middleware(RefusalReasons)

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        return None


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
