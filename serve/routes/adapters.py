"""Adapters by hand: list what is served, load and unload (admin key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from lorastack.adapters.manifest import AdapterError, AdapterNotFoundError
from lorastack.serve.protocol import AdapterAction, AdapterStatus, ApiError
from lorastack.serve.registry import Served, UnknownModelError
from lorastack.serve.routes.classify import validation_message
from lorastack.serve.routes.common import GatewayDep, read_json, require_admin, require_api_key

router = APIRouter()


@router.get("/v1/adapters", dependencies=[Depends(require_api_key)])
async def list_adapters(gw: GatewayDep) -> dict:
    reg = gw.registry
    return {"object": "list", "capacity": reg.capacity,
            "data": [_status(reg.current[n]).model_dump() for n in reg.names()],
            "draining": [s.identity for s in reg.draining],
            "unloaded": sorted(reg.disabled), "refused": reg.problems}


@router.post("/v1/adapters/load", dependencies=[Depends(require_admin)])
async def load(request: Request, gw: GatewayDep) -> dict:
    name = await _name(request)
    try:
        served = await gw.registry.add(name, eager=True)
    except AdapterNotFoundError as exc:
        raise ApiError(404, str(exc), "adapter_not_found", "name") from None
    except AdapterError as exc:
        raise ApiError(422, f"cannot serve it: {exc}", "adapter_not_servable", "name") from None
    gw.metrics.adapters_served.set(len(gw.registry.current))
    return {"status": "loaded", **_status(served).model_dump()}


@router.post("/v1/adapters/unload", dependencies=[Depends(require_admin)])
async def unload(request: Request, gw: GatewayDep) -> dict:
    name = await _name(request)
    if not await gw.registry.remove(name, by_hand=True):
        gw.registry.disabled.discard(name)
        raise UnknownModelError(name, [gw.registry.base_name, *gw.registry.names()])
    gw.metrics.adapters_served.set(len(gw.registry.current))
    return {"status": "unloaded", "name": name,
            "note": "requests already running on it finish first; it stays unloaded until "
                    "loaded again or rewritten in the store"}


async def _name(request: Request) -> str:
    try:
        return AdapterAction.model_validate(await read_json(request)).name
    except ValidationError as exc:
        raise ApiError(422, validation_message(exc), "invalid_request") from None


def _status(s: Served) -> AdapterStatus:
    return AdapterStatus(name=s.name, identity=s.identity, task=s.manifest.task,
                         labels=list(s.manifest.labels),
                         loaded_on=[e.url for e in s.loaded if s.is_loaded(e)],
                         inflight=s.inflight)
