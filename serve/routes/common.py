"""What every route needs: the gateway, auth, and a JSON body read within the size limit and
validated by the route's pydantic model (which also describes it in /openapi.json)."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from lorastack.adapters.manifest import AdapterError
from lorastack.adapters.validation import explain_errors
from lorastack.serve.engine import EngineError
from lorastack.serve.gateway import Gateway
from lorastack.serve.protocol import ApiError
from lorastack.serve.registry import UnknownModelError
from lorastack.serve.scoring import PromptTooLong

M = TypeVar("M", bound=BaseModel)
BODIES: dict[Callable[..., Any], type[BaseModel]] = {}  # json_body's readers -> their models


# the domain errors of the engine, the registry, label scoring and the adapter contract, which
# routes let through to the app's handler (the gateway's) or the replica route's (endpoint.py)
DOMAIN_ERRORS = (ApiError, UnknownModelError, EngineError, PromptTooLong, AdapterError)


def as_api_error(exc: Exception) -> ApiError:
    """The HTTP answer to one of DOMAIN_ERRORS: the one mapping from domain errors to HTTP."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UnknownModelError):
        return ApiError(exc.status, str(exc), exc.code, "model")
    if isinstance(exc, EngineError):
        busy = exc.status == 503
        return ApiError(exc.status, str(exc), "engine_unavailable" if busy else "engine_error",
                        headers={"Retry-After": "5"} if busy else None)
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), "prompt_too_long", "input")
    if isinstance(exc, AdapterError):
        return ApiError(422, str(exc), "adapter_not_servable", "model")
    raise TypeError(f"not a domain error: {exc!r}")


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(gateway)]


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def _matches(key: str, candidates: list[str]) -> bool:
    return any(secrets.compare_digest(key.encode(), c.encode()) for c in candidates)


def require_api_key(request: Request) -> None:
    """/v1 routes: any API key (or the admin key), when keys are configured."""
    s = gateway(request).settings
    if not s.auth_required:
        return
    key = _presented_key(request)
    if not key:
        raise ApiError(401, "missing API key: send the header `Authorization: Bearer <key>`",
                       "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(key, [*s.api_keys, *([s.admin_key] if s.admin_key else [])]):
        raise ApiError(401, "invalid API key: check the key you were given",
                       "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request) -> None:
    """Load/unload: the admin key when one is set (API keys are not enough); without an admin
    key (allowed on loopback only) the same rule as the /v1 routes."""
    s = gateway(request).settings
    if not s.admin_key:
        require_api_key(request)
        return
    key = _presented_key(request)
    if not key:
        raise ApiError(401, "missing admin key: send `Authorization: Bearer <admin key>`",
                       "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not _matches(key, [s.admin_key]):
        raise ApiError(403, "this route needs the admin key (an API key is not enough)",
                       "admin_key_required")


async def read_json(request: Request) -> dict:
    """The body as a JSON object; 413 over the size limit, 400 when it does not parse."""
    limit = gateway(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", "invalid_json") \
            from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply to read; send a flat JSON "
                       "object", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got "
                       f"{type(body).__name__}", "invalid_json")
    if _SURROGATE_ESCAPE.search(raw):  # JSON may escape half a UTF-16 pair; no tokenizer reads it
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
            raise ApiError(400, f"the request body holds a lone UTF-16 surrogate ({bad}, half "
                           f"of a pair); send valid Unicode text", "invalid_json") from None
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more; the limit is {limit} "
                    f"(LORASTACK_MAX_BODY_BYTES). Send fewer or shorter inputs.",
                    "body_too_large")


def json_body(model: type[M], *, status: int = 422, code: str | None = None) -> Any:
    """A dependency: the body, read by `read_json`, validated by `model`. A body that does not
    fit answers `status` with every wrong field named; `code` (default: `missing_<field>` for a
    missing field, else `invalid_request`) and `param` come from the first error."""

    async def body(request: Request) -> M:
        raw = await read_json(request)
        try:
            return model.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else None
            what = code or (f"missing_{field}" if first["type"] == "missing" and field
                            else "invalid_request")
            raise ApiError(status, validation_message(exc, model), what, field) from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply to validate",
                           "invalid_json") from None

    BODIES[body] = model  # the schema /openapi.json shows (serve/app.py)
    return Depends(body)


def documented(model: type[BaseModel]) -> dict:
    """`openapi_extra` of a route whose body `json_body(model)` reads."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def validation_message(exc: Any, model: type[BaseModel] | None = None) -> str:
    """Every error of `exc` (pydantic's ValidationError or FastAPI's RequestValidationError),
    as `field: what is wrong` (lorastack.adapters.validation)."""
    return "invalid request: " + explain_errors(exc.errors(), model)
