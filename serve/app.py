"""create_app(settings) -> the FastAPI gateway. Its lifespan starts vLLM (or checks the
upstreams), loads the store, and stops everything on shutdown."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorastack import __version__
from lorastack.serve.gateway import Gateway
from lorastack.serve.protocol import ErrorResponse, error_body
from lorastack.serve.routes import adapters, classify, openai, ops
from lorastack.serve.routes.common import BODIES, DOMAIN_ERRORS, as_api_error, validation_message
from lorastack.serve.settings import ServeSettings

log = logging.getLogger("lorastack.serve")


def create_app(settings: ServeSettings | None = None, gateway: Gateway | None = None) -> FastAPI:
    gw = gateway or Gateway(settings or ServeSettings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="lorastack gateway", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.gateway = gw
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": what} for code, what in (
        ("4XX", "the request was refused: `error.message` says why and what to do"),
        ("5XX", "the engine failed or is restarting (503 comes with Retry-After)"))}
    for module in (openai, classify, adapters, ops):
        app.include_router(module.router, responses=errors)
    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        model = getattr(request.state, "model", "")
        if model and not all(map(gw.reg.serves, model.split(","))):
            model = "unknown"  # a label per made-up name would grow /metrics without end
        gw.metrics.requests.labels(path, model, str(response.status_code)).inc()
        gw.metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, plus the request bodies the routes read with `json_body` (they read
    the body themselves, within the size limit, so FastAPI does not see the models)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                      description="lorastack's gateway: OpenAI's routes over vLLM, with LoRA "
                      "adapters hot-swapped from the store, and /v1/classify.")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for route in app.routes:
        for dep in getattr(getattr(route, "dependant", None), "dependencies", []):
            model = BODIES.get(dep.call) if dep.call is not None else None
            if model is not None:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
    app.openapi_schema = doc
    return doc


def _json_error(status: int, message: str, code: str, param: str | None = None,
                headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status,
                        headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def domain_error(_: Request, exc: Exception):
        err = as_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, domain_error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        return _json_error(422, validation_message(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        message = ("no such route; the gateway serves /v1/models, /v1/completions, "
                   "/v1/chat/completions, /v1/classify, /v1/adapters, /health, /metrics"
                   if exc.status_code == 404 else str(exc.detail))
        return _json_error(exc.status_code, message, "not_found" if exc.status_code == 404
                           else "http_error")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        return _json_error(500, f"internal error ({type(exc).__name__}: {exc}); this is a bug "
                           f"in the gateway, please report it", "internal_error")
