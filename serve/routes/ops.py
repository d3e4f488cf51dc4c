"""GET /health (gateway and vLLM) and GET /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from lorastack.serve.protocol import EngineHealth, Health, RefusedShape
from lorastack.serve.routes.common import GatewayDep, require_api_key

router = APIRouter()


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(gw: GatewayDep) -> JSONResponse:
    """200 when at least one vLLM engine is up; 503 (with the reasons) when none is."""
    up = any(e.up for e in gw.engines)
    body = Health(
        status="ok" if up else "unavailable",
        vllm=[EngineHealth(url=e.url, up=e.up, reason=e.reason,
                           adapters_loaded=gw.registry.loaded_count(e) if gw.registry else 0)
              for e in gw.engines],
        adapters=len(gw.registry.current) if gw.registry else 0,
        engine_deaths=len(gw.guard.deaths),
        refused_shapes=[RefusedShape(shape=str(shape), why=why)
                        for shape, why in gw.guard.blocked.items()])
    return JSONResponse(body.model_dump(), status_code=200 if up else 503)


@router.get("/metrics", dependencies=[Depends(require_api_key)], response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}})
async def metrics(gw: GatewayDep) -> Response:
    for e in gw.engines:
        gw.metrics.vllm_up.labels(e.url).set(int(e.up))
    return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)
